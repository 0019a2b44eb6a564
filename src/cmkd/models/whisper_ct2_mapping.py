"""CTranslate2 Whisper tensors → transformers `WhisperForConditionalGeneration` parameters, strictly.

Why this module exists: the tensor map is the part of the conversion that must be exactly right, so it is kept
apart from reading the file and rebuilding the tokenizer, to be read as one piece: `infer_dims` reads the sizes
off the tensors, `mapping_plan` assigns every CTranslate2 tensor (fused q/k/v split by rows) to named parameters,
and `map_tensors` applies the plan.

The mapping is strict on purpose: a tensor we do not map, a shape that disagrees with the inferred config,
a flag that changes the architecture, or a transformers parameter left unset is an error naming the tensor.
A silently half-loaded encoder would still produce features, just wrong ones, and nothing downstream would
notice until distillation failed to learn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cmkd.errors import UserError

# Scalar attributes a WhisperSpec serialises next to the weights. Each either configures the architecture
# (then it must hold the one value transformers' Whisper implements) or is metadata transformers has no use
# for. Any other scalar is an unknown architecture switch and stops the conversion.
_ACTIVATION_GELU = 3  # common_spec.Activation.GELU; transformers Whisper uses exact (erf) GELU.
_REQUIRED_SCALARS: dict[str, int] = {
    "decoder/activation": _ACTIVATION_GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,  # WhisperConfig.scale_embedding=False
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
_HEAD_COUNT_SCALARS = ("encoder/num_heads", "decoder/num_heads")
# ct2's legacy single-layer alignment settings; timestamps alignment heads live in config.json instead.
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")


# ---------------------------------------------------------------------------------------------------------
# Architecture inference and the tensor mapping


@dataclass(frozen=True)
class WhisperDims:
    """Sizes read off the CTranslate2 tensors: everything WhisperConfig needs besides token ids."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    max_source_positions: int
    max_target_positions: int


def _count_layers(tensors: dict[str, np.ndarray], stack: str) -> int:
    indices = {int(match.group(1)) for name in tensors if (match := re.match(rf"{stack}/layer_(\d+)/", name))}
    if indices != set(range(len(indices))):
        raise UserError(f"{stack}: layer indices are not contiguous from 0: {sorted(indices)}")
    return len(indices)


def _require(tensors: dict[str, np.ndarray], name: str, source: Path) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"{source}: tensor {name} is missing; not a complete Whisper model")
    return tensors[name]


def infer_dims(tensors: dict[str, np.ndarray], scalars: dict[str, int], source: Path) -> WhisperDims:
    conv1 = _require(tensors, "encoder/conv1/weight", source)  # (d_model, n_mels, 3)
    d_model, num_mel_bins = int(conv1.shape[0]), int(conv1.shape[1])
    heads: dict[str, int] = {}
    for scalar in _HEAD_COUNT_SCALARS:
        if scalar not in scalars:
            raise UserError(f"{source}: attribute {scalar} is missing; cannot tell the attention head count")
        count = scalars[scalar]
        if count <= 0 or d_model % count:
            raise UserError(f"{source}: {scalar}={count} does not divide d_model={d_model}")
        heads[scalar] = count
    return WhisperDims(
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=_count_layers(tensors, "encoder"),
        decoder_layers=_count_layers(tensors, "decoder"),
        encoder_attention_heads=heads["encoder/num_heads"],
        decoder_attention_heads=heads["decoder/num_heads"],
        encoder_ffn_dim=int(_require(tensors, "encoder/layer_0/ffn/linear_0/weight", source).shape[0]),
        decoder_ffn_dim=int(_require(tensors, "decoder/layer_0/ffn/linear_0/weight", source).shape[0]),
        vocab_size=int(_require(tensors, "decoder/embeddings/weight", source).shape[0]),
        max_source_positions=int(_require(tensors, "encoder/position_encodings/encodings", source).shape[0]),
        max_target_positions=int(_require(tensors, "decoder/position_encodings/encodings", source).shape[0]),
    )


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of a CTranslate2 tensor go to one transformers parameter (None: must be all zero)."""

    hf_name: str | None
    start: int
    stop: int


@dataclass
class _Plan:
    """For each CTranslate2 tensor, the transformers parameters its rows become."""

    pieces: dict[str, list[_Piece]] = field(default_factory=dict)

    def whole(self, ct2_name: str, hf_name: str, rows: int) -> None:
        self.pieces[ct2_name] = [_Piece(hf_name, 0, rows)]

    def split(self, ct2_name: str, hf_names: Sequence[str | None], rows_each: int) -> None:
        # Fused projections are concatenated along the output (row) dimension, in hf_names order.
        self.pieces[ct2_name] = [
            _Piece(hf_name, index * rows_each, (index + 1) * rows_each)
            for index, hf_name in enumerate(hf_names)
        ]

    def linear(self, ct2_prefix: str, hf_prefix: str, rows: int) -> None:
        self.whole(f"{ct2_prefix}/weight", f"{hf_prefix}.weight", rows)
        self.whole(f"{ct2_prefix}/bias", f"{hf_prefix}.bias", rows)

    def layer_norm(self, ct2_prefix: str, hf_prefix: str, d_model: int) -> None:
        self.whole(f"{ct2_prefix}/gamma", f"{hf_prefix}.weight", d_model)
        self.whole(f"{ct2_prefix}/beta", f"{hf_prefix}.bias", d_model)

    def attention(self, ct2_prefix: str, hf_prefix: str, d_model: int, *, fused_qkv: bool) -> None:
        """Self-attention fuses [q; k; v] into linear_0; cross-attention keeps q in linear_0 and fuses [k; v]
        into linear_1. Whisper's k_proj has no bias: CTranslate2 stores zeros in its slot, checked here."""
        q, k, v, out = (f"{hf_prefix}.{proj}_proj" for proj in ("q", "k", "v", "out"))
        if fused_qkv:
            self.split(
                f"{ct2_prefix}/linear_0/weight", [f"{q}.weight", f"{k}.weight", f"{v}.weight"], d_model
            )
            self.split(f"{ct2_prefix}/linear_0/bias", [f"{q}.bias", None, f"{v}.bias"], d_model)
            self.linear(f"{ct2_prefix}/linear_1", out, d_model)
        else:
            self.linear(f"{ct2_prefix}/linear_0", q, d_model)
            self.split(f"{ct2_prefix}/linear_1/weight", [f"{k}.weight", f"{v}.weight"], d_model)
            self.split(f"{ct2_prefix}/linear_1/bias", [None, f"{v}.bias"], d_model)
            self.linear(f"{ct2_prefix}/linear_2", out, d_model)

    def feed_forward(self, ct2_prefix: str, hf_prefix: str, d_model: int, ffn_dim: int) -> None:
        self.layer_norm(f"{ct2_prefix}/layer_norm", f"{hf_prefix}.final_layer_norm", d_model)
        self.linear(f"{ct2_prefix}/linear_0", f"{hf_prefix}.fc1", ffn_dim)
        self.linear(f"{ct2_prefix}/linear_1", f"{hf_prefix}.fc2", d_model)


def mapping_plan(dims: WhisperDims) -> _Plan:
    """The complete CTranslate2 → transformers name map for a Whisper of these sizes."""
    plan = _Plan()
    d = dims.d_model
    for conv in ("conv1", "conv2"):
        plan.linear(f"encoder/{conv}", f"model.encoder.{conv}", d)
    plan.whole(
        "encoder/position_encodings/encodings",
        "model.encoder.embed_positions.weight",
        dims.max_source_positions,
    )
    for index in range(dims.encoder_layers):
        ct2, hf = f"encoder/layer_{index}", f"model.encoder.layers.{index}"
        plan.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", d)
        plan.attention(f"{ct2}/self_attention", f"{hf}.self_attn", d, fused_qkv=True)
        plan.feed_forward(f"{ct2}/ffn", hf, d, dims.encoder_ffn_dim)
    plan.layer_norm("encoder/layer_norm", "model.encoder.layer_norm", d)

    plan.whole("decoder/embeddings/weight", "model.decoder.embed_tokens.weight", dims.vocab_size)
    plan.whole(
        "decoder/position_encodings/encodings",
        "model.decoder.embed_positions.weight",
        dims.max_target_positions,
    )
    for index in range(dims.decoder_layers):
        ct2, hf = f"decoder/layer_{index}", f"model.decoder.layers.{index}"
        plan.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", d)
        plan.attention(f"{ct2}/self_attention", f"{hf}.self_attn", d, fused_qkv=True)
        plan.layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", d)
        plan.attention(f"{ct2}/attention", f"{hf}.encoder_attn", d, fused_qkv=False)
        plan.feed_forward(f"{ct2}/ffn", hf, d, dims.decoder_ffn_dim)
    plan.layer_norm("decoder/layer_norm", "model.decoder.layer_norm", d)
    # The output projection: tied to the token embeddings in transformers (an alias in CTranslate2). An
    # untied file maps to its own parameter (the caller then saves with tie_word_embeddings=False).
    plan.whole("decoder/projection/weight", "proj_out.weight", dims.vocab_size)
    plan.split("decoder/projection/bias", [None], dims.vocab_size)  # transformers' proj_out has no bias
    return plan


def check_scalars(scalars: dict[str, int], source: Path) -> None:
    for name, value in scalars.items():
        if name in _HEAD_COUNT_SCALARS or name in _IGNORED_SCALARS:
            continue
        if name not in _REQUIRED_SCALARS:
            raise RuntimeError(
                f"{source}: attribute {name}={value} is not part of the Whisper architecture this converter "
                "maps; refusing to guess what it changes"
            )
        if value != _REQUIRED_SCALARS[name]:
            raise RuntimeError(
                f"{source}: attribute {name}={value}, but transformers' Whisper implements "
                f"{name}={_REQUIRED_SCALARS[name]}"
            )


def map_tensors(
    tensors: dict[str, np.ndarray], plan: _Plan, expected_shapes: dict[str, torch.Size], source: Path
) -> dict[str, torch.Tensor]:
    """Apply the plan; every CTranslate2 tensor must be used and every transformers parameter set once."""
    unmapped = sorted(set(tensors) - set(plan.pieces))
    if unmapped:
        raise RuntimeError(f"{source}: tensors with no transformers counterpart: {', '.join(unmapped)}")
    state: dict[str, torch.Tensor] = {}
    for ct2_name, pieces in plan.pieces.items():
        if ct2_name not in tensors:
            if ct2_name == "decoder/projection/bias":
                continue  # optional: CTranslate2 writes it only for models whose projection has a bias
            raise RuntimeError(f"{source}: tensor {ct2_name} is missing")
        array = tensors[ct2_name]
        total_rows = pieces[-1].stop
        if array.shape[0] != total_rows:
            raise RuntimeError(
                f"{source}: tensor {ct2_name} has shape {array.shape}, expected {total_rows} rows"
            )
        for piece in pieces:
            rows = array[piece.start : piece.stop]
            if piece.hf_name is None:
                if np.any(rows != 0):
                    raise RuntimeError(
                        f"{source}: tensor {ct2_name} rows {piece.start}:{piece.stop} must be zero "
                        "(transformers' Whisper has no bias there)"
                    )
                continue
            if piece.hf_name not in expected_shapes:
                raise RuntimeError(f"internal: {ct2_name} maps to unknown parameter {piece.hf_name}")
            if piece.hf_name in state:
                raise RuntimeError(f"internal: parameter {piece.hf_name} mapped twice")
            if tuple(rows.shape) != tuple(expected_shapes[piece.hf_name]):
                raise RuntimeError(
                    f"{source}: tensor {ct2_name} rows {piece.start}:{piece.stop} have shape "
                    f"{tuple(rows.shape)}; {piece.hf_name} needs {tuple(expected_shapes[piece.hf_name])}"
                )
            state[piece.hf_name] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    unset = sorted(set(expected_shapes) - set(state))
    if unset:
        raise RuntimeError(f"{source}: transformers parameters left unset: {', '.join(unset)}")
    return state
