"""The paired record: one question as text and as speech, with its gold answer and the teacher's answer.

Every stage after `sources` reads and writes these (design.md §6). In memory a record is flat
(`record.prompt`, `record.teacher_response`); on disk it is the nested layout other tools expect:

    {"id": "q1", "text": {"prompt": "What is the capital of France?", "system": null},
     "speech": [{"audio": "audio/hibari/q1.flac", "sr": 16000, "source": "hibari", "voice": "",
                 "transcript": "what is the capital of france", "wer": 0.0}],
     "target": "Paris",
     "teacher": {"response": "The capital of France is Paris.", "response_ids": [504, 3575, 282, 4649],
                 "truncated": false},
     "choices": null, "answer": null, "task": "short_answer", "category": "capitals", "meta": {}}

`text.prompt` is the exact wording the audio speaks: the teacher reads it, the TTS speaks it, the student hears
it. `teacher.response_ids` are the token ids of ŷ that the teacher logit cache rows belong to; training uses
them as they are, because decoding ids to text and encoding it again need not give the same ids. They and
`teacher.truncated` (ŷ was cut at the token limit) are written only when known. Records validate themselves
when built, so an invalid record cannot exist; errors name the record id and the field. Audio paths are
relative to the data root and `resolve_audio_path` refuses any that leave it (`..`, absolute paths, symlinks
pointing out), because manifests may come from other people.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cmkd.data.jsonl_io import ParseError, RejectsLog, atomic_write_bytes, dumps_line, read_jsonl
from cmkd.errors import UserError


class RecordError(UserError):
    """A record field is invalid. Carries the parts separately so batch readers can turn it into a Reject."""

    def __init__(self, item_id: str, field_name: str, problem: str) -> None:
        super().__init__(f"{item_id}/{field_name}: {problem}")
        self.item_id = item_id
        self.field_name = field_name
        self.problem = problem


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_str(
    item_id: str, name: str, value: Any, *, optional: bool = False, non_empty: bool = False
) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RecordError(item_id, name, f"must be a string, got {_type_name(value)}")
    if non_empty and not value.strip():
        raise RecordError(item_id, name, "is empty")


def check_relative_audio_path(item_id: str, rel: Any, field_name: str = "speech.audio") -> None:
    """Refuse audio paths that are not plain relative paths inside the data root (checked without the disk)."""
    _require_str(item_id, field_name, rel, non_empty=True)
    if "\x00" in rel or "\\" in rel:
        raise RecordError(item_id, field_name, f"'{rel}' must use '/' separators and no NUL characters")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise RecordError(
            item_id, field_name, f"'{rel}' is absolute; audio paths are relative to the data root"
        )
    if ".." in PurePosixPath(rel).parts:
        raise RecordError(
            item_id, field_name, f"'{rel}' contains '..'; audio paths must stay inside the data root"
        )


def resolve_audio_path(root: str | Path, rel: str, item_id: str = "audio") -> Path:
    """The absolute path of audio `rel` under `root`; UserError if it would leave the root, symlinks included."""
    check_relative_audio_path(item_id, rel)
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / rel).resolve()
    if not candidate.is_relative_to(root_resolved):
        raise RecordError(item_id, "speech.audio", f"'{rel}' resolves outside the data root (symlink?)")
    return candidate


def resolve_manifest_path(root: str | Path, name: str, key: str) -> Path:
    """`root / name` for a manifest named in the config; UserError naming `key` if a symlink leads out of the root
    (absolute names and '..' are refused when the config is loaded, `DataSettings.validate`)."""
    root_resolved = Path(root).resolve()
    if not (root_resolved / name).resolve().is_relative_to(root_resolved):
        raise UserError(
            f"{key}: '{name}' resolves outside data.root '{root}' (a symlink?); refusing to read it"
        )
    return Path(root) / name


@dataclass
class SpeechClip:
    """One spoken rendition of the prompt: a file under the data root plus who or what spoke it."""

    audio: str
    sr: int
    source: str
    voice: str = ""
    transcript: str | None = None
    wer: float | None = None

    def validate(self, item_id: str) -> None:
        check_relative_audio_path(item_id, self.audio)
        if isinstance(self.sr, bool) or not isinstance(self.sr, int) or self.sr <= 0:
            raise RecordError(item_id, "speech.sr", f"must be a positive integer, got {self.sr!r}")
        _require_str(item_id, "speech.source", self.source, non_empty=True)
        _require_str(item_id, "speech.voice", self.voice)
        _require_str(item_id, "speech.transcript", self.transcript, optional=True)
        if self.wer is not None:
            if isinstance(self.wer, bool) or not isinstance(self.wer, int | float):
                raise RecordError(item_id, "speech.wer", f"must be a number, got {_type_name(self.wer)}")
            if not math.isfinite(self.wer) or self.wer < 0:
                raise RecordError(item_id, "speech.wer", f"must be finite and >= 0, got {self.wer}")

    def to_json(self) -> dict[str, Any]:
        return {
            "audio": self.audio,
            "sr": self.sr,
            "source": self.source,
            "voice": self.voice,
            "transcript": self.transcript,
            "wer": self.wer,
        }

    @classmethod
    def from_json(cls, data: Any, item_id: str) -> SpeechClip:
        if not isinstance(data, Mapping):
            raise RecordError(item_id, "speech", f"each clip must be an object, got {_type_name(data)}")
        _reject_unknown_keys(item_id, "speech", data, {"audio", "sr", "source", "voice", "transcript", "wer"})
        clip = cls(
            audio=data.get("audio"),  # type: ignore[arg-type]  # validated just below
            sr=data.get("sr"),  # type: ignore[arg-type]
            source=data.get("source"),  # type: ignore[arg-type]
            voice=data.get("voice", ""),
            transcript=data.get("transcript"),
            wer=data.get("wer"),
        )
        clip.validate(item_id)
        return clip


@dataclass
class PairedRecord:
    """One question (text + spoken renditions) with its gold answer y and the teacher's response ŷ."""

    id: str
    prompt: str
    system: str | None = None
    speech: list[SpeechClip] = field(default_factory=list)
    target: str | None = None
    teacher_response: str | None = None
    teacher_response_ids: list[int] | None = None
    teacher_truncated: bool | None = None
    choices: list[str] | None = None
    answer: str | None = None
    task: str | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RecordError naming the id and field of the first problem found."""
        if not isinstance(self.id, str) or not self.id.strip():
            raise RecordError(str(self.id), "id", "must be a non-empty string")
        item_id = self.id
        _require_str(item_id, "text.prompt", self.prompt, non_empty=True)
        _require_str(item_id, "text.system", self.system, optional=True)
        if not isinstance(self.speech, list):
            raise RecordError(item_id, "speech", f"must be a list, got {_type_name(self.speech)}")
        for clip in self.speech:
            if not isinstance(clip, SpeechClip):
                raise RecordError(item_id, "speech", f"items must be SpeechClip, got {_type_name(clip)}")
            clip.validate(item_id)
        for name in ("target", "teacher_response", "answer", "task", "category"):
            _require_str(item_id, _JSON_NAMES.get(name, name), getattr(self, name), optional=True)
        _check_response_ids(item_id, self.teacher_response_ids)
        if self.teacher_truncated is not None and not isinstance(self.teacher_truncated, bool):
            raise RecordError(
                item_id,
                "teacher.truncated",
                f"must be true or false, got {_type_name(self.teacher_truncated)}",
            )
        if self.choices is not None and (
            not isinstance(self.choices, list) or not all(isinstance(c, str) for c in self.choices)
        ):
            raise RecordError(item_id, "choices", "must be a list of strings")
        if not isinstance(self.meta, dict):
            raise RecordError(item_id, "meta", f"must be an object, got {_type_name(self.meta)}")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise RecordError(item_id, "meta", f"is not plain JSON ({err})") from None

    def to_json(self) -> dict[str, Any]:
        """The nested on-disk layout (see the module docstring)."""
        return {
            "id": self.id,
            "text": {"prompt": self.prompt, "system": self.system},
            "speech": [clip.to_json() for clip in self.speech],
            "target": self.target,
            "teacher": self._teacher_json(),
            "choices": self.choices,
            "answer": self.answer,
            "task": self.task,
            "category": self.category,
            "meta": self.meta,
        }

    def _teacher_json(self) -> dict[str, Any]:
        teacher: dict[str, Any] = {"response": self.teacher_response}
        if self.teacher_response_ids is not None:
            teacher["response_ids"] = list(self.teacher_response_ids)
        if self.teacher_truncated is not None:
            teacher["truncated"] = self.teacher_truncated
        return teacher

    @classmethod
    def from_json(cls, data: Any) -> PairedRecord:
        """Build from the nested layout; RecordError (a UserError) names the id and field of any problem."""
        if not isinstance(data, Mapping):
            raise RecordError("?", "record", f"must be an object, got {_type_name(data)}")
        raw_id = data.get("id")
        item_id = raw_id if isinstance(raw_id, str) and raw_id.strip() else "?"
        if item_id == "?":
            raise RecordError(item_id, "id", f"must be a non-empty string, got {raw_id!r}")
        _reject_unknown_keys(item_id, "record", data, set(_TOP_LEVEL_KEYS))
        text = _section(item_id, data, "text", {"prompt", "system"})
        teacher = _section(item_id, data, "teacher", {"response", "response_ids", "truncated"})
        speech = data.get("speech") or []
        if not isinstance(speech, list):
            raise RecordError(item_id, "speech", f"must be a list, got {_type_name(speech)}")
        meta = data.get("meta")
        return cls(
            id=item_id,
            prompt=text.get("prompt"),  # type: ignore[arg-type]  # validated in __post_init__
            system=text.get("system"),
            speech=[SpeechClip.from_json(clip, item_id) for clip in speech],
            target=data.get("target"),
            teacher_response=teacher.get("response"),
            teacher_response_ids=teacher.get("response_ids"),
            teacher_truncated=teacher.get("truncated"),
            choices=data.get("choices"),
            answer=data.get("answer"),
            task=data.get("task"),
            category=data.get("category"),
            meta={} if meta is None else meta,
        )


_JSON_NAMES = {"teacher_response": "teacher.response"}


def _check_response_ids(item_id: str, ids: Any) -> None:
    if ids is None:
        return
    if not isinstance(ids, list) or not all(
        isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in ids
    ):
        raise RecordError(item_id, "teacher.response_ids", "must be a list of non-negative integer token ids")


_TOP_LEVEL_KEYS = (
    "id",
    "text",
    "speech",
    "target",
    "teacher",
    "choices",
    "answer",
    "task",
    "category",
    "meta",
)


def _reject_unknown_keys(item_id: str, where: str, data: Mapping[str, Any], known: set[str]) -> None:
    """Unknown keys are refused rather than dropped: a typo ('promt') must not silently lose data."""
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise RecordError(
            item_id, where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def _section(item_id: str, data: Mapping[str, Any], name: str, known: set[str]) -> Mapping[str, Any]:
    section = data.get(name)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise RecordError(item_id, name, f"must be an object, got {_type_name(section)}")
    _reject_unknown_keys(item_id, name, section, known)
    return section


# ---------------------------------------------------------------------------------------------------------------
# Manifests: JSONL and Parquet
# ---------------------------------------------------------------------------------------------------------------

_CLIP_TYPE = pa.struct(
    [
        ("audio", pa.string()),
        ("sr", pa.int32()),
        ("source", pa.string()),
        ("voice", pa.string()),
        ("transcript", pa.string()),
        ("wer", pa.float64()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.struct([("prompt", pa.string()), ("system", pa.string())])),
        ("speech", pa.list_(_CLIP_TYPE)),
        ("target", pa.string()),
        (
            "teacher",
            pa.struct(
                [("response", pa.string()), ("response_ids", pa.list_(pa.int64())), ("truncated", pa.bool_())]
            ),
        ),
        ("choices", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("task", pa.string()),
        ("category", pa.string()),
        # `meta` holds free-form keys that differ per row; Parquet needs one struct type per column, so it is
        # stored as a JSON string and decoded on read.
        ("meta", pa.string()),
    ]
)


def write_manifest(path: str | Path, records: list[PairedRecord]) -> None:
    """Write records atomically as JSONL or Parquet, chosen by the suffix (.jsonl / .parquet)."""
    target = Path(path)
    _check_unique_ids(records)
    suffix = target.suffix.lower()
    if suffix == ".jsonl":
        atomic_write_bytes(target, b"".join(dumps_line(record.to_json()) for record in records))
    elif suffix == ".parquet":
        rows = []
        for record in records:
            row = record.to_json()
            row["meta"] = json.dumps(row["meta"], ensure_ascii=False)
            rows.append(row)
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write_bytes(target, buffer.getvalue())
    else:
        raise UserError(f"{target}: manifest must end in .jsonl or .parquet")


def _check_unique_ids(records: list[PairedRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise RecordError(record.id, "id", "appears more than once in the manifest")
        seen.add(record.id)


def read_manifest(path: str | Path, rejects: RejectsLog | None = None) -> list[PairedRecord]:
    """Read a JSONL or Parquet manifest.

    Without `rejects`, the first bad row raises a UserError naming the line/row and field. With `rejects`, bad rows
    are recorded there and skipped, so a batch stage can go on with the good ones.
    """
    source = Path(path)
    if not source.is_file():
        raise UserError(f"{source}: manifest not found")
    suffix = source.suffix.lower()
    meta_as_text = False
    if suffix == ".jsonl":
        rows: list[tuple[str, Any]] = []
        for line_no, value in read_jsonl(source):
            rows.append((f"{source.name}:{line_no}", value))
    elif suffix == ".parquet":
        rows = [(f"{source.name}:row {index}", row) for index, row in enumerate(_read_parquet_rows(source))]
        meta_as_text = True
    else:
        raise UserError(f"{source}: manifest must end in .jsonl or .parquet")
    records: list[PairedRecord] = []
    seen: set[str] = set()
    for where, value in rows:
        try:
            record = _row_to_record(where, value, meta_as_text)
            if record.id in seen:
                raise RecordError(record.id, "id", "appears more than once in the manifest")
        except RecordError as err:
            if rejects is None:
                raise UserError(f"{where}: {err}") from None
            # A stable reason ("invalid text.prompt", "malformed JSON") so the summary can count by it.
            reason = value.reason if isinstance(value, ParseError) else f"invalid {err.field_name}"
            rejects.add(err.item_id if err.item_id != "?" else where, err.field_name, reason, err.problem)
            continue
        seen.add(record.id)
        records.append(record)
    return records


def _row_to_record(where: str, value: Any, meta_as_text: bool) -> PairedRecord:
    if isinstance(value, ParseError):
        raise RecordError(where, "line", f"{value.reason} ({value.detail})")
    meta = value.get("meta")
    if meta_as_text and isinstance(meta, str):
        try:
            value = {**value, "meta": json.loads(meta)}
        except ValueError:
            item_id = value.get("id") if isinstance(value.get("id"), str) else where
            raise RecordError(item_id, "meta", "is not valid JSON text") from None
    return PairedRecord.from_json(value)


def _read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    return table.to_pylist()
