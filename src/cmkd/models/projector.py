"""Speech connectors: encoder frames [B, T, D_enc] (50 Hz for Whisper) -> LM input embeddings [B, T/k, H].

Both projectors shorten the sequence k times (k = `ProjectorSettings.stack`; 8 takes Whisper's 50 Hz to 6.25
audio tokens/s, Ultravox's choice) and carry a frame mask, so a batch of clips of different lengths gives each clip
exactly the audio tokens of its own frames: an output position is valid if any frame it covers is valid. Padded
frames are zeroed before they can mix into a valid position, so a clip's embeddings do not depend on what it is
batched with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import UserError
from cmkd.stage_configs import Activation, ProjectorKind, ProjectorSettings


def stack_mask(frame_mask: torch.Tensor, stack: int) -> torch.Tensor:
    """[B, T] bool -> [B, ceil(T/k)] bool: a group of k frames is valid if any of its frames is."""
    batch, length = frame_mask.shape
    padded = F.pad(frame_mask, (0, (-length) % stack), value=False)  # B, T -> B, T' with T' = k*ceil(T/k)
    return padded.reshape(batch, -1, stack).any(dim=-1)  # B, T' -> B, T'/k, k -> B, T'/k


def stack_frames(
    frames: torch.Tensor, frame_mask: torch.Tensor, stack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every `stack` consecutive frames: [B, T, D], [B, T] -> [B, ceil(T/k), k*D], [B, ceil(T/k)].

    The tail is zero-padded (a clip's last partial group is its remaining frames plus zeros)."""
    batch, length, dim = frames.shape
    frames = frames * frame_mask.unsqueeze(-1).to(frames.dtype)  # B, T, D (padded frames -> 0)
    frames = F.pad(frames, (0, 0, 0, (-length) % stack))  # B, T, D -> B, T', D with T' = k*ceil(T/k)
    stacked = frames.reshape(batch, -1, stack * dim)  # B, T', D -> B, T'/k, k*D
    return stacked, stack_mask(frame_mask, stack)


class StackMLPProjector(nn.Module):
    """Stack k frames, then LayerNorm -> Linear -> SwiGLU | GELU -> Linear into the LM width (Ultravox style)."""

    def __init__(
        self, encoder_dim: int, lm_dim: int, stack: int, hidden: int, activation: Activation
    ) -> None:
        super().__init__()
        self.stack = stack
        self.activation = activation
        stacked_dim = stack * encoder_dim
        # SwiGLU needs a gate and a value branch of width `hidden` each, so the first layer is twice as wide.
        first_out = 2 * hidden if activation is Activation.SWIGLU else hidden
        self.norm = nn.LayerNorm(stacked_dim)
        self.linear_in = nn.Linear(stacked_dim, first_out)
        self.linear_out = nn.Linear(hidden, lm_dim)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, D_enc], [B, T] bool -> embeddings [B, ceil(T/k), H], mask [B, ceil(T/k)] bool."""
        stacked, stacked_mask = stack_frames(frames, frame_mask, self.stack)  # B, T, D -> B, T/k, k*D
        hidden = self.linear_in(self.norm(stacked))  # B, T/k, k*D -> B, T/k, hidden (x2 for SwiGLU)
        hidden = activate(hidden, self.activation)  # B, T/k, hidden
        return self.linear_out(hidden), stacked_mask  # B, T/k, hidden -> B, T/k, H


class ConvProjector(nn.Module):
    """LayerNorm, then strided Conv1d blocks whose strides multiply to k (BLSP style), then Linear to the LM width.

    k is factored into strides of 2 where it can be (8 -> 2, 2, 2) and one block per remaining prime factor;
    each block has kernel 2s+1 and padding s, which maps T frames to exactly ceil(T/s) outputs."""

    def __init__(
        self, encoder_dim: int, lm_dim: int, stack: int, hidden: int, activation: Activation
    ) -> None:
        super().__init__()
        self.activation = activation
        self.strides = _prime_factors(stack)
        conv_out = 2 * hidden if activation is Activation.SWIGLU else hidden
        self.norm = nn.LayerNorm(encoder_dim)
        channels = [encoder_dim] + [hidden] * len(self.strides)
        self.convs = nn.ModuleList(
            nn.Conv1d(channels_in, conv_out, kernel_size=2 * stride + 1, stride=stride, padding=stride)
            for channels_in, stride in zip(channels[:-1], self.strides, strict=True)
        )
        self.linear_out = nn.Linear(channels[-1], lm_dim)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, D_enc], [B, T] bool -> embeddings [B, ceil(T/k), H], mask [B, ceil(T/k)] bool."""
        mask = frame_mask
        hidden = self.norm(frames) * mask.unsqueeze(-1).to(frames.dtype)  # B, T, D (padded frames -> 0)
        for conv, stride in zip(self.convs, self.strides, strict=True):
            hidden = conv(hidden.transpose(1, 2)).transpose(1, 2)  # B, T, C -> B, C, T -> B, ceil(T/s), C'
            hidden = activate(hidden, self.activation)  # B, T/s, C' -> B, T/s, hidden
            mask = stack_mask(mask, stride)  # B, T -> B, ceil(T/s)
            # The bias makes padded outputs non-zero; zero them so the next conv sees what a lone clip would.
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # B, T/s, hidden
        return self.linear_out(hidden), mask  # B, T/k, hidden -> B, T/k, H


def activate(hidden: torch.Tensor, activation: Activation) -> torch.Tensor:
    """GELU, or SwiGLU on a [.., 2*h] input: silu(gate) * value -> [.., h]."""
    if activation is Activation.SWIGLU:
        gate, value = hidden.chunk(2, dim=-1)  # .., 2h -> .., h and .., h
        return F.silu(gate) * value  # .., h
    return F.gelu(hidden)


def _prime_factors(number: int) -> list[int]:
    """8 -> [2, 2, 2], 6 -> [2, 3], 1 -> [1] (one unstrided block, so k = 1 still has a conv)."""
    factors: list[int] = []
    remaining = number
    for divisor in range(2, math.isqrt(number) + 1):
        while remaining % divisor == 0:
            factors.append(divisor)
            remaining //= divisor
    if remaining > 1:
        factors.append(remaining)
    return factors or [1]


Projector = StackMLPProjector | ConvProjector


def build_projector(settings: ProjectorSettings, encoder_dim: int, lm_dim: int) -> Projector:
    """The projector `settings.kind` names, from encoder width to LM width."""
    kind = ProjectorKind(settings.kind)
    if kind is ProjectorKind.POSTERIOR:
        raise UserError(
            "projector.kind=posterior: not a frame projector; build it with "
            "cmkd.models.posterior_connector.build_posterior_connector (build_student does)"
        )
    projector_class = StackMLPProjector if kind is ProjectorKind.STACK_MLP else ConvProjector
    return projector_class(
        encoder_dim, lm_dim, settings.stack, settings.hidden, Activation(settings.activation)
    )
