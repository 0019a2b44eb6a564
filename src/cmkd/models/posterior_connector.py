"""The posterior-embedding connector (`ProjectorKind.POSTERIOR`): Whisper's per-token posteriors, bridged into the
LM's input-embedding space, plus a small trainable residual.

    e_n = Σ_k p̂_nk · B[id_nk]  +  MLP(LayerNorm(h_n))          one LM position per decoded Whisper token n

- `B` [V_whisper, H_lm], the vocabulary bridge: each Whisper token's text re-tokenised by the LM tokenizer and the
  LM's input embeddings of those pieces averaged (`build_vocab_bridge`). Fixed, not trained.
- `p̂_nk`: Whisper's top-k probabilities at step n, renormalised over the ids the bridge knows (special tokens
  such as <|endoftext|> have no text, so they neither count nor shrink the vector).
- `h_n` [D_whisper]: the decoder's final hidden state at step n; the MLP's output layer starts at zero, so an
  untrained connector IS the bridged posteriors, and training only learns corrections on top.

Why: a projector on encoder frames has to learn Whisper-frame -> LM-word alignment from scratch, and on a 2-core
CPU that takes far longer than the demo has (research/cpu-feasibility*.md: question type learnt, content not).
Here the LM reads (soft) words of its own vocabulary from step 0; distillation then trains only the residual.

Trade-offs (what this buys and what it costs):
- Content from the start, but only what Whisper heard: an ASR error is the LM's error too. The top-k keeps
  runner-up words that the residual and the LM can use, which a 1-best cascade throws away; paralinguistic cues
  (tone, speaker, emotion) never reach the LM except through the decoder state.
- Whisper's decoder runs autoregressively per clip (slower than one encoder pass), so the prepare stage should
  cache the posteriors (`cmkd.models.posterior.save_posterior_cache`) and training reads the cache.
- One position per Whisper token, about 3 per second of speech against 6.25 for the stack-8 projector. A Whisper
  token that the LM splits into several pieces gets their mean, which blurs rare words; the residual can learn
  to sharpen them, and the mean keeps the sequence aligned with what Whisper decoded.
- The bridge depends on both tokenizers and on the LM's input embeddings AT BUILD TIME. It is rebuilt (in
  seconds) from the frozen parts a checkpoint names, never saved (115 MiB fp32 for Whisper x SmolLM2): a
  checkpoint holds the residual only. With lm_mode lora/full the bridge keeps the base embeddings, at training
  and after reloading alike.
- The residual starts at zero and Adam's first steps move a zero-initialised output layer by about
  lr x ||activations||_1 per output: at the frame projector's lr (2e-3) that is several times the LM's embedding
  scale and swamps the bridged words, so train this connector at a much lower lr (1e-4 in the benchmark).
- Whisper decoding is greedy and frozen: gradients reach the residual MLP only, never the bridge or Whisper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cmkd.models.posterior import PosteriorFeatures, WhisperPosteriorDecoder, text_token_mask
from cmkd.models.projector import activate
from cmkd.stage_configs import Activation, ProjectorSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, WhisperForConditionalGeneration


def build_vocab_bridge(
    speech_tokenizer: PreTrainedTokenizerBase,
    lm_tokenizer: PreTrainedTokenizerBase,
    lm_embeddings: torch.Tensor,
    speech_vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bridge [V_s, H] (mean LM input embedding of each speech token's text) and known mask [V_s] bool.

    A token's text is what the speech tokenizer decodes it to on its own, leading space included (" Paris"), so
    the LM tokenizer sees the word as it would inside a sentence. Rows stay zero and unknown for special/added
    tokens, ids past the tokenizer, and pieces that are not whole UTF-8 (they decode to U+FFFD)."""
    known = text_token_mask(speech_tokenizer, speech_vocab_size)  # V_s
    ids = known.nonzero().squeeze(1).tolist()
    texts = speech_tokenizer.batch_decode([[index] for index in ids], clean_up_tokenization_spaces=False)
    pieces = lm_tokenizer(texts, add_special_tokens=False)["input_ids"]
    usable = [
        n for n, (text, ids_n) in enumerate(zip(texts, pieces, strict=True)) if ids_n and "\ufffd" not in text
    ]
    known[:] = False
    known[[ids[n] for n in usable]] = True
    flat = torch.tensor([piece for n in usable for piece in pieces[n]], dtype=torch.long)  # P
    starts = torch.tensor([0] + [len(pieces[n]) for n in usable[:-1]], dtype=torch.long).cumsum(0)  # U
    weight = lm_embeddings.detach().float()
    bridge = torch.zeros(speech_vocab_size, weight.shape[1])  # V_s, H
    if usable:
        means = F.embedding_bag(flat.to(weight.device), weight, starts.to(weight.device), mode="mean")  # U, H
        bridge[[ids[n] for n in usable]] = means.cpu()
    return bridge, known


def pad_posteriors(
    features: Sequence[PosteriorFeatures],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-clip features -> right-padded topk_ids [B, N, k], topk_probs [B, N, k], decoder_hidden [B, N, D] (zeros
    past each clip's steps) and step mask [B, N] bool."""
    lengths = [item.topk_ids.shape[0] for item in features]
    batch, steps = len(features), max(lengths, default=0)
    top_k, hidden_size = features[0].top_k, features[0].decoder_hidden.shape[1]
    topk_ids = torch.zeros(batch, steps, top_k, dtype=torch.long)  # B, N, k
    topk_probs = torch.zeros(batch, steps, top_k)  # B, N, k
    decoder_hidden = torch.zeros(batch, steps, hidden_size)  # B, N, D
    for row, item in enumerate(features):
        topk_ids[row, : lengths[row]] = item.topk_ids
        topk_probs[row, : lengths[row]] = item.topk_probs
        decoder_hidden[row, : lengths[row]] = item.decoder_hidden
    step_mask = torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]  # B, N
    return topk_ids, topk_probs, decoder_hidden, step_mask


class PosteriorConnector(nn.Module):
    """Bridged Whisper posteriors + zero-initialised residual MLP on the decoder state -> LM input embeddings."""

    def __init__(
        self,
        decoder: WhisperPosteriorDecoder,
        bridge: torch.Tensor,
        bridge_known: torch.Tensor,
        hidden: int,
        activation: Activation,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.top_k = decoder.top_k
        self.activation = activation
        # Buffers, not parameters, and not persistent: rebuilt from the frozen parts, never trained or saved.
        self.register_buffer("bridge", bridge, persistent=False)  # V_s, H
        self.register_buffer("bridge_known", bridge_known, persistent=False)  # V_s bool
        first_out = 2 * hidden if activation is Activation.SWIGLU else hidden
        self.norm = nn.LayerNorm(decoder.hidden_size)
        self.linear_in = nn.Linear(decoder.hidden_size, first_out)
        self.linear_out = nn.Linear(hidden, bridge.shape[1])
        # Zero output layer: at initialisation the residual adds exactly nothing (the LM reads the bridge alone),
        # and the first gradient step still reaches linear_out (its input, the hidden activations, is non-zero).
        nn.init.zeros_(self.linear_out.weight)
        nn.init.zeros_(self.linear_out.bias)

    @property
    def input_width(self) -> int:
        """Width of this connector's cached input per step: k ids + k probs + the decoder state."""
        return 2 * self.top_k + self.decoder.hidden_size

    def train(self, mode: bool = True) -> PosteriorConnector:
        """The residual follows `mode`; the Whisper decoder stays frozen in eval mode."""
        super().train(mode)
        self.decoder.train(False)
        return self

    def bridged(self, topk_ids: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
        """[B, N, k] ids and probs -> [B, N, H]: the probability-weighted mean of the bridge rows."""
        weights = topk_probs * self.bridge_known[topk_ids].to(topk_probs.dtype)  # B, N, k (unknown ids -> 0)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # renormalise over known ids
        rows = self.bridge[topk_ids]  # B, N, k -> B, N, k, H
        return torch.einsum("bnk,bnkh->bnh", weights, rows)  # B, N, H

    def forward(self, features: Sequence[PosteriorFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-clip posteriors -> embeddings [B, N, H] (zeros past each clip) and step mask [B, N] bool."""
        device = self.linear_out.weight.device
        topk_ids, topk_probs, decoder_hidden, step_mask = (
            tensor.to(device) for tensor in pad_posteriors(features)
        )  # B, N, k; B, N, k; B, N, D; B, N
        residual = self.linear_in(self.norm(decoder_hidden))  # B, N, D -> B, N, hidden (x2 for SwiGLU)
        residual = self.linear_out(activate(residual, self.activation))  # B, N, hidden -> B, N, H
        embeds = self.bridged(topk_ids, topk_probs) + residual  # B, N, H
        return embeds * step_mask.unsqueeze(-1).to(embeds.dtype), step_mask


def build_posterior_connector(
    settings: ProjectorSettings,
    whisper: WhisperForConditionalGeneration,
    speech_tokenizer: PreTrainedTokenizerBase,
    lm_embeddings: torch.Tensor,
    lm_tokenizer: PreTrainedTokenizerBase,
) -> PosteriorConnector:
    """The connector `settings` describe, on a frozen Whisper (decoder + output layer) and the LM's embeddings."""
    decoder = WhisperPosteriorDecoder(
        whisper,
        speech_tokenizer,
        top_k=settings.posterior_top_k,
        max_tokens=settings.posterior_max_tokens,
        window_s=settings.posterior_window_s,
    )
    speech_vocab = int(whisper.get_output_embeddings().weight.shape[0])
    bridge, known = build_vocab_bridge(speech_tokenizer, lm_tokenizer, lm_embeddings, speech_vocab)
    device = lm_embeddings.device
    activation = Activation(settings.activation)
    return PosteriorConnector(decoder, bridge.to(device), known.to(device), settings.hidden, activation)
