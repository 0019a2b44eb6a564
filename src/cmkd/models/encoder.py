"""The speech encoder: 16 kHz audio -> Whisper encoder frames [B, T_enc, D] at their real length, plus a frame mask.

Why not call `WhisperEncoder.forward`: in transformers 5 it (a) rejects any input that is not exactly 3000 mel
frames (30 s), (b) adds all 1500 position embeddings, and (c) passes no attention mask to its layers. Padding every
clip to 30 s costs 10x the compute for a 3 s question, and without a mask a short clip batched with a long one would
attend to padding. So `encode_mel` runs the encoder's own modules (conv1, conv2, embed_positions, layers,
layer_norm) in the same order, with three changes: the position table is sliced to the real length T_enc, the
layers get a padding mask built by transformers' `create_bidirectional_mask` (right format for eager/SDPA/flash),
and padded mel and conv1 frames are zeroed so a clip's valid frames equal what it would get alone. The weights and
the per-layer maths stay transformers' (no model code is copied); on a full 3000-frame input the output equals
`WhisperEncoder.forward` (tested). Not applied: LayerDrop (0 in released checkpoints).

Whisper was trained on 30 s windows, so real-length features differ from padded-window features; that is fine for
a projector trained on top of them (Ultravox does the same), but a feature cache must come from this same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import UserError
from cmkd.models.speech_lm import SAMPLE_RATE

if TYPE_CHECKING:
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

EMBEDDED_ENCODER_NAMES = frozenset({"whisper-tiny.en", "embedded"})
MIN_AUDIO_SAMPLES = 400
"""One STFT window (25 ms); shorter clips give no mel frame."""


class WhisperSpeechEncoder(nn.Module):
    """A Whisper encoder that takes real-length audio; frozen (eval, no grad, no graph kept) unless made trainable."""

    def __init__(self, whisper_encoder: WhisperEncoder, feature_extractor: WhisperFeatureExtractor) -> None:
        super().__init__()
        if feature_extractor.feature_size != whisper_encoder.config.num_mel_bins:
            raise UserError(
                f"student.encoder: feature extractor makes {feature_extractor.feature_size} mel bins but the "
                f"encoder expects {whisper_encoder.config.num_mel_bins}"
            )
        self.whisper = whisper_encoder
        self.feature_extractor = feature_extractor
        self.trainable = False
        self.set_trainable(False)

    @classmethod
    def from_model(cls, model: nn.Module) -> WhisperSpeechEncoder:
        """Wrap the encoder of a WhisperForConditionalGeneration / WhisperModel, or a bare WhisperEncoder."""
        from transformers import WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        whisper_encoder = (
            model if isinstance(model, WhisperEncoder) else getattr(model, "get_encoder", lambda: None)()
        )
        if not isinstance(whisper_encoder, WhisperEncoder):
            raise UserError(f"student.encoder: expected a Whisper model, got {type(model).__name__}")
        feature_extractor = WhisperFeatureExtractor(feature_size=whisper_encoder.config.num_mel_bins)
        return cls(whisper_encoder, feature_extractor)

    @classmethod
    def from_pretrained(cls, directory: Path) -> WhisperSpeechEncoder:
        """Load only the encoder half of a Whisper checkpoint dir (save_pretrained layout)."""
        from transformers import AutoConfig, WhisperFeatureExtractor, WhisperModel

        if not (directory / "config.json").is_file():
            raise UserError(
                f"student.encoder: {directory} has no config.json; expected a Whisper checkpoint dir"
            )
        config = AutoConfig.from_pretrained(directory)
        if config.model_type != "whisper":
            raise UserError(f"student.encoder: {directory} holds a '{config.model_type}' model, not Whisper")
        # WhisperModel drops the ForConditionalGeneration head; the decoder is freed right after.
        try:  # safetensors only: a pickled pytorch_model.bin can run code when it is loaded
            whisper = WhisperModel.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise UserError(f"student.encoder: could not load {directory} ({error})") from None
        whisper_encoder = whisper.get_encoder()
        if (directory / "preprocessor_config.json").is_file():
            feature_extractor = WhisperFeatureExtractor.from_pretrained(directory)
        else:
            feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        return cls(whisper_encoder, feature_extractor)

    @property
    def hidden_size(self) -> int:
        return int(self.whisper.config.d_model)

    @property
    def max_frames(self) -> int:
        """Longest encoder output (1500 frames = 30 s for released checkpoints)."""
        return int(self.whisper.embed_positions.num_embeddings)

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable
        self.whisper.requires_grad_(trainable)
        self.whisper.embed_positions.requires_grad_(False)  # a fixed sinusoid table in Whisper, never trained
        self.train(self.training)

    def train(self, mode: bool = True) -> WhisperSpeechEncoder:
        """A frozen encoder stays in eval mode whatever the caller asks (no dropout on frozen features)."""
        super().train(mode and self.trainable)
        self.training = mode
        return self

    def log_mel(self, audio: np.ndarray) -> torch.Tensor:
        """16 kHz mono float32 [S] -> log-mel [n_mels, S // 160], computed on the clip alone (no 30 s padding)."""
        max_samples = self.max_frames * 2 * self.feature_extractor.hop_length
        if not MIN_AUDIO_SAMPLES <= len(audio) <= max_samples:
            raise UserError(
                f"prompt.audio: clip has {len(audio)} samples; the encoder takes {MIN_AUDIO_SAMPLES} to "
                f"{max_samples} ({max_samples / SAMPLE_RATE:.0f} s at 16 kHz)"
            )
        features: Any = self.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt"
        )["input_features"]
        return features[0]  # 1, n_mels, S/160 -> n_mels, S/160

    def forward(self, audios: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of clips -> frames [B, T_enc, D] (zeros past each clip's end) and frame mask [B, T_enc] bool."""
        mels = [self.log_mel(audio) for audio in audios]  # B x [n_mels, T_mel_b]
        mel_lengths = torch.tensor([mel.shape[-1] for mel in mels])  # B
        device = self.whisper.conv1.weight.device
        batch_mel = torch.zeros(len(mels), mels[0].shape[0], int(mel_lengths.max()))  # B, n_mels, T_mel
        for row, mel in enumerate(mels):
            batch_mel[row, :, : mel.shape[-1]] = mel
        return self.encode_mel(batch_mel.to(device), mel_lengths.to(device))

    def encode_mel(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel [B, n_mels, T_mel] with per-clip lengths [B] -> frames [B, ceil(T_mel/2), D], mask [B, T_enc]."""
        from transformers.masking_utils import create_bidirectional_mask

        whisper = self.whisper
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            mel_mask = torch.arange(mel.shape[-1], device=mel.device) < mel_lengths[:, None]  # B, T_mel
            mel = mel.to(whisper.conv1.weight.dtype) * mel_mask[:, None, :]  # B, n_mels, T_mel
            hidden = F.gelu(whisper.conv1(mel)) * mel_mask[:, None, :]  # B, n_mels, T_mel -> B, D, T_mel
            hidden = F.gelu(whisper.conv2(hidden))  # B, D, T_mel -> B, D, T_enc (stride 2)
            hidden = hidden.transpose(1, 2)  # B, D, T_enc -> B, T_enc, D
            enc_len = hidden.shape[1]
            if enc_len > self.max_frames:
                raise UserError(
                    f"prompt.audio: {enc_len} encoder frames exceed the encoder's {self.max_frames}"
                )
            enc_lengths = (mel_lengths + 1) // 2  # B: stride-2 conv with padding 1 keeps ceil(T_mel / 2)
            frame_mask = torch.arange(enc_len, device=mel.device) < enc_lengths[:, None]  # B, T_enc
            hidden = hidden + whisper.embed_positions.weight[:enc_len]  # B, T_enc, D + T_enc, D
            hidden = F.dropout(hidden, p=whisper.config.dropout, training=self.training and self.trainable)
            # None (no padding), or B, 1, T_enc, T_enc in the format the attention implementation wants.
            layer_mask = create_bidirectional_mask(
                config=whisper.config, inputs_embeds=hidden, attention_mask=frame_mask
            )
            for layer in whisper.layers:
                hidden = layer(hidden, layer_mask)  # B, T_enc, D
            hidden = whisper.layer_norm(hidden) * frame_mask.unsqueeze(-1).to(hidden.dtype)  # B, T_enc, D
        return hidden, frame_mask


def load_whisper_encoder(source: str) -> WhisperSpeechEncoder:
    """'whisper-tiny.en' (the embedded default, converted once into the cmkd cache) or a local Whisper dir."""
    if source.strip().lower() in EMBEDDED_ENCODER_NAMES:
        from cmkd import assets

        return WhisperSpeechEncoder.from_pretrained(assets.whisper_path())
    directory = Path(source).expanduser()
    if not directory.is_dir():
        raise UserError(
            f"student.encoder: '{source}' is neither 'whisper-tiny.en' nor a local Whisper checkpoint dir"
        )
    return WhisperSpeechEncoder.from_pretrained(directory)


def pad_frames(frame_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip frames [T_b, D] -> right-padded [B, max T_b, D] (zeros) and frame mask [B, max T_b] bool."""
    lengths = [frames.shape[0] for frames in frame_list]
    first = frame_list[0]
    padded = first.new_zeros(len(frame_list), max(lengths), first.shape[1])  # B, T, D
    for row, frames in enumerate(frame_list):
        padded[row, : frames.shape[0]] = frames
    frame_mask = (
        torch.arange(max(lengths), device=first.device) < torch.tensor(lengths, device=first.device)[:, None]
    )
    return padded, frame_mask  # B, T, D and B, T
