"""Typed configuration: defaults < YAML file < dotted CLI overrides, validated, never silently fixed.

Every stage's settings are plain dataclasses whose fields are declared with `param(default, doc, ...)`. The doc
string is the field's documentation: `cmkd <stage> --help` prints it, and the resolved config written into each
run directory carries the same keys. One merge order, one validator:

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["train.lr=1e-4", "train.steps=10"])

Why hand-written and not OmegaConf: we want one-line errors that name the key and the reason (unknown key with a
suggestion, wrong type, out-of-range value), enums checked by name, and no interpolation magic that can rewrite
a value behind the user's back. The whole machinery is the ~250 lines below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cmkd.errors import UserError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = _MISSING,
) -> Any:
    """Declare a config field with its documentation and optional numeric bounds.

    Mutable defaults (lists, dicts, nested settings) go through `factory`, as with `dataclasses.field`.
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, list | dict | set):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class StrEnum(enum.StrEnum):
    """Enum whose values are their lower-case names, so YAML and the CLI read naturally (`divergence: forward_kl`)."""


# ---------------------------------------------------------------------------------------------------------------
# Building a dataclass instance from plain data, with validation
# ---------------------------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Build `cls` from a nested mapping; every key must exist and every value must have the declared type."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            known = ", ".join(sorted(fields))
            raise UserError(f"config key '{prefix}{key}': unknown key{hint}; known keys here: {known}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    instance = cls(**kwargs)
    for name, fld in fields.items():
        _check_bounds(fld, getattr(instance, name), f"{prefix}{name}")
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def _describe_type(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and where lossless, convert) `value` to the declared type `tp`; raise a UserError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(
            errors[0] if len(options) == 1 else f"{key}: {value!r} matches none of the allowed types"
        )
    if value is None:
        raise UserError(f"{key}: must be set (got null)")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, Sequence, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise UserError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if str(value).lower() in (str(member.value).lower(), member.name.lower()):
                return member
        raise UserError(f"{key}: {value!r} is not {_describe_type(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path) and str(value):
            return Path(value)
        raise UserError(f"{key}: expected a path, got {value!r}")
    raise TypeError(
        f"config field {key}: unsupported type {tp!r}"
    )  # a bug in a settings class, not user input


def _check_bounds(fld: dataclasses.Field[Any], value: Any, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    meta = fld.metadata
    checks = (
        ("ge", lambda b: value >= b, ">="),
        ("gt", lambda b: value > b, ">"),
        ("le", lambda b: value <= b, "<="),
        ("lt", lambda b: value < b, "<"),
    )
    for name, ok, symbol in checks:
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise UserError(f"{key}: {value} is out of range; it must be {symbol} {bound}")


# ---------------------------------------------------------------------------------------------------------------
# The merge: defaults < YAML < dotted overrides
# ---------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are read as YAML scalars (so `true`, `3`, `[1, 2]`)."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads `1e-4` as a string: accept it as the number the user meant.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return key.split("."), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping; missing file or bad YAML is a user error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}': not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"config file '{path}': not valid YAML ({first_line})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}': the top level must be a mapping of sections")
    return data


def merge(base: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set `base[k1][k2]... = value`, creating sections on the way."""
    node = base
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(
                f"override '{'.'.join(keys)}': '{'.'.join(keys[: i + 1])}' is a value, not a section"
            )
        node = child
    node[keys[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """The one merge order: dataclass defaults < YAML file < dotted CLI overrides; then validate."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        merge(data, keys, value)
    return from_dict(cls, data)


# ---------------------------------------------------------------------------------------------------------------
# Writing back out and documenting
# ---------------------------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe data (enums by value, paths as strings) for a settings instance."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent shards never share a temp file
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    key: str
    type: str
    default: str
    doc: str


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every leaf field of a settings class with its type, default and doc: the body of `--help`."""
    rows: list[FieldDoc] = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for fld in dataclasses.fields(cls):
        tp = hints[fld.name]
        key = f"{prefix}{fld.name}"
        default = getattr(instance, fld.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix=f"{key}."))
            continue
        bounds = [
            f"{sym} {fld.metadata[name]}"
            for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if fld.metadata.get(name) is not None
        ]
        doc = fld.metadata.get("doc", "")
        if bounds:
            doc = f"{doc} [{', '.join(bounds)}]"
        type_name = _type_name(tp)
        rows.append(
            FieldDoc(
                key,
                type_name,
                yaml.safe_dump(to_dict(default), default_flow_style=True)
                .strip()
                .removesuffix("\n...")
                .removesuffix("..."),
                doc,
            )
        )
    return rows


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + ",".join(str(m.value) for m in tp) + "}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
