"""CTranslate2's `model.bin` read without the CTranslate2 runtime: named arrays, aliases, dequantisation.

Why this module exists: the embedded Whisper ships only as CTranslate2 files, and two users read them: the
converter (`whisper_ct2_convert`, which needs every weight as its own float32 array) and the CTranslate2
transcriber (`whisper_ct2`, which needs the decoder's length). The format is a plain little-endian list of named
arrays (see `read_ct2_model_bin`), parsed here byte by byte; a truncated or malformed file is a UserError that
names the offset, never a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmkd.errors import UserError

# model.bin facts, from CTranslate2's python/ctranslate2/specs/model_spec.py (`_serialize`) and
# src/models/model.cc (`Model::load`): binary versions >= 4 store a dtype id and a byte count per variable,
# versions >= 3 end with (alias, target) name pairs. Whisper specs were only ever written as version >= 4.
_SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
WHISPER_SPEC_NAME = "WhisperSpec"
MAX_WHISPER_SPEC_REVISION = 3
# DataType enum order of include/ctranslate2/types.h. bfloat16 has no numpy dtype: read as uint16 bit patterns.
_CT2_DTYPES: dict[int, tuple[str, np.dtype[Any]]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),
}


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


def float_weights(model_bin: Ct2ModelBin, source: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
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
