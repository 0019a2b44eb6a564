"""Question sources -> paired records (prepare stage 1): generic JSONL/Parquet, OpenOrca, VoiceBench, the demo set.

Every reader yields `(raw_id, row)` pairs (raw_id is `file:line` or `file:row N`) or a `Reject` for a row that
could not even be read; a converter turns each row into a `PairedRecord` or a `Reject`. Nothing raises in the
middle of a stream because of one bad item: malformed JSON, non-UTF-8 bytes, a missing or wrongly typed field,
empty or absurdly long text, corrupt audio all become rejects naming the item (its id, or file and line when the
id itself is unusable) and the reason. Problems with the source as a whole (file missing, not Parquet, a column
absent from the schema, no usable item at all) raise a `UserError`, because no item could succeed.

VoiceBench rows carry their audio as a `{bytes, path}` struct. The bytes are decoded with soundfile (no
torchcodec), mixed to mono, resampled to 16 kHz and handed to an `AudioWriter`, which stores them under the data
root and returns the relative path that goes into the record. VoiceBench prompts are kept verbatim: they are
what the audio says.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr

from cmkd.config import StrEnum
from cmkd.data.demo_questions import load_demo_questions
from cmkd.data.jsonl_io import ParseError, Reject, RejectsLog, atomic_write_bytes, read_jsonl
from cmkd.data.records import PairedRecord, RecordError, SpeechClip
from cmkd.errors import UserError
from cmkd.stage_configs import SourceSettings

SAMPLE_RATE = 16_000
Row = tuple[str, dict[str, Any]]


class SourceKind(StrEnum):
    DEMO = "demo"
    JSONL = "jsonl"
    PARQUET = "parquet"
    OPENORCA = "openorca"
    VOICEBENCH = "voicebench"


@dataclass(frozen=True)
class TextLimits:
    """Text longer than this is rejected at read time (a 100k-character 'question' is a data error)."""

    max_chars: int = 20_000
    max_id_chars: int = 200


@dataclass(frozen=True)
class FieldMap:
    """Which row fields hold the id, question, gold answer and system prompt ('' = the source has none)."""

    id_field: str = "id"
    prompt_field: str = "question"
    target_field: str = "answer"
    system_field: str = ""

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> FieldMap:
        return cls(settings.id_field, settings.prompt_field, settings.target_field, settings.system_field)


OPENORCA_FIELDS = FieldMap(
    id_field="id", prompt_field="question", target_field="response", system_field="system_prompt"
)

# ---------------------------------------------------------------------------------------------------------------
# Row readers
# ---------------------------------------------------------------------------------------------------------------


def iter_jsonl_rows(path: Path) -> Iterator[Row | Reject]:
    """Rows of a JSONL file; unreadable lines come out as rejects with `file:line` ids."""
    for line_no, value in read_jsonl(path):
        raw_id = f"{path.name}:{line_no}"
        if isinstance(value, ParseError):
            yield Reject(raw_id, "line", value.reason, value.detail)
        else:
            yield raw_id, value


def iter_parquet_rows(path: Path, required_columns: tuple[str, ...] = ()) -> Iterator[Row | Reject]:
    """Rows of a Parquet file, read in batches; a damaged row group ends the file with one reject."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [name for name in required_columns if name and name not in parquet.schema_arrow.names]
    if missing:
        have = ", ".join(parquet.schema_arrow.names)
        raise UserError(f"{path}: column(s) {', '.join(missing)} not found; the file has: {have}")
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{path.name}:row {index}", row
                index += 1
    except (pa.ArrowException, OSError) as err:
        yield Reject(
            f"{path.name}:row {index}", "file", "unreadable parquet data", f"{err}; rest of file skipped"
        )


# ---------------------------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_text(value: Any, limits: TextLimits) -> tuple[str, str] | None:
    """None when `value` is usable text, else (reason, detail)."""
    if value is None:
        return "missing field", "absent or null"
    if not isinstance(value, str):
        return "wrong type", f"expected text, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid unicode", "contains a lone surrogate"
    if not value.strip():
        return "empty text", f"{value!r}"
    if len(value) > limits.max_chars:
        return "text too long", f"{len(value)} characters > {limits.max_chars}"
    if _CONTROL.search(value):
        return "control characters", "contains control characters other than tab and newline"
    return None


def _read_id(raw_id: str, row: dict[str, Any], id_field: str, limits: TextLimits) -> str | Reject:
    if not id_field:
        return raw_id
    value = row.get(id_field)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return Reject(raw_id, id_field, "missing field" if value is None else "bad id", f"{value!r}"[:80])
    if len(value) > limits.max_id_chars or _CONTROL.search(value):
        return Reject(raw_id, id_field, "bad id", f"{value[:80]!r}")
    return value.strip()


def row_to_record(
    raw_id: str, row: dict[str, Any], fields: FieldMap, source: str, limits: TextLimits = TextLimits()
) -> PairedRecord | Reject:
    """One text row -> record, or a Reject naming the field. Configured fields must be present."""
    item_id = _read_id(raw_id, row, fields.id_field, limits)
    if isinstance(item_id, Reject):
        return item_id
    values: dict[str, str | None] = {}
    for role, name in (("prompt", fields.prompt_field), ("target", fields.target_field)):
        if not name:
            values[role] = None
            continue
        problem = _check_text(row.get(name), limits)
        if problem:
            return Reject(item_id, name, *problem)
        values[role] = row[name]
    system = row.get(fields.system_field) if fields.system_field else None
    if isinstance(system, str) and not system.strip():
        system = None  # an empty system prompt means "none" (most OpenOrca rows)
    elif system is not None:
        problem = _check_text(system, limits)
        if problem:
            return Reject(item_id, fields.system_field, *problem)
    try:
        return PairedRecord(
            id=item_id,
            prompt=values["prompt"] or "",
            system=system,
            target=values["target"],
            meta={"source": source, "source_item": raw_id},
        )
    except RecordError as err:
        return Reject(item_id, err.field_name, "invalid record", err.problem)


# ---------------------------------------------------------------------------------------------------------------
# Audio (VoiceBench)
# ---------------------------------------------------------------------------------------------------------------

AudioWriter = Callable[[str, np.ndarray, int], str]
"""(item_id, mono float32 samples, sample rate) -> path of the stored file, relative to the data root."""


class AudioDecodeError(ValueError):
    """Embedded audio bytes are not decodable audio."""


class AudioTooLongError(AudioDecodeError):
    """The header says the clip is longer than allowed; raised before decoding, so hours of audio are not read."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"{seconds:.1f} s")
        self.seconds = seconds


def decode_audio(data: bytes, target_sr: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode WAV/FLAC/OGG (whatever libsndfile reads) to mono float32 at `target_sr`."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as audio_file:
            sr = int(audio_file.samplerate)
            if max_seconds is not None and sr > 0 and audio_file.frames / sr > max_seconds:
                raise AudioTooLongError(audio_file.frames / sr)
            samples = audio_file.read(dtype="float32", always_2d=True)  # frames, channels
    except AudioTooLongError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        # libsndfile's own words, without the repr of our in-memory buffer that str(err) starts with
        raise AudioDecodeError(getattr(err, "error_string", None) or str(err)) from None
    if samples.size == 0:
        raise AudioDecodeError("no samples")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioDecodeError("non-finite samples")
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr).astype(np.float32)
    return mono


def safe_file_stem(item_id: str) -> str:
    """A filename from an id: readable part plus a short hash, so distinct ids never collide ('a/b' vs 'a_b')."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._")[:80] or "item"
    return f"{readable}-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()[:8]}"


class FlacAudioWriter:
    """Writes 16-bit mono FLAC files under `root/subdir`, atomically; returns paths relative to `root`."""

    def __init__(self, root: str | Path, subdir: str = "audio/source") -> None:
        self.root = Path(root)
        self.subdir = subdir.strip("/")

    def __call__(self, item_id: str, samples: np.ndarray, sr: int) -> str:
        relative = f"{self.subdir}/{safe_file_stem(item_id)}.flac"
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(samples, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
        atomic_write_bytes(self.root / relative, buffer.getvalue())
        return relative


_VOICEBENCH_TASKS = {
    "alpacaeval": "open", "alpacaeval_full": "open", "alpacaeval_speaker": "open", "commoneval": "open",
    "wildvoice": "open", "mtbench": "open", "sd-qa": "ref_qa", "openbookqa": "mcq", "mmsu": "mcq",
    "bbh": "binary", "ifeval": "ifeval", "advbench": "refusal",
}  # fmt: skip
_HUMAN_SPEECH = {"commoneval", "wildvoice", "sd-qa", "bbh"}


def voicebench_row_to_record(
    raw_id: str,
    row: dict[str, Any],
    *,
    subset: str,
    split: str,
    index: int,
    audio_writer: AudioWriter,
    max_seconds: float = 30.0,
    limits: TextLimits = TextLimits(),
) -> PairedRecord | Reject:
    """One VoiceBench row -> record with one speech clip; ids are `voicebench/<subset>/<split>/<row>`."""
    item_id = f"voicebench/{subset}/{split}/{index:06d}"
    problem = _check_text(row.get("prompt"), limits)
    if problem:
        return Reject(item_id, "prompt", *problem)
    audio = row.get("audio")
    data = audio.get("bytes") if isinstance(audio, dict) else None
    if not isinstance(data, bytes | bytearray) or not data:
        return Reject(item_id, "audio", "missing audio", "no embedded bytes in the audio column")
    try:
        samples = decode_audio(bytes(data), max_seconds=max_seconds)
    except AudioTooLongError as err:
        return Reject(item_id, "audio", "audio too long", f"{err.seconds:.1f} s > {max_seconds} s")
    except AudioDecodeError as err:
        return Reject(item_id, "audio", "corrupt audio", str(err)[:200])
    seconds = len(samples) / SAMPLE_RATE
    if seconds > max_seconds:
        return Reject(item_id, "audio", "audio too long", f"{seconds:.1f} s > {max_seconds} s")
    reference = next((row[k] for k in ("reference", "output", "answer") if isinstance(row.get(k), str)), None)
    meta = {key: value for key, value in row.items() if key not in ("audio", "prompt") and _is_plain(value)}
    meta.update({"source": "voicebench", "subset": subset, "split": split, "source_item": raw_id})
    clip = SpeechClip(
        audio=audio_writer(item_id, samples, SAMPLE_RATE),
        sr=SAMPLE_RATE,
        source="human" if subset in _HUMAN_SPEECH else "google_tts",
        voice=split if subset == "sd-qa" else "",
    )
    task = _VOICEBENCH_TASKS.get(subset)
    answer = reference if task in ("mcq", "binary") else None
    return PairedRecord(
        id=item_id, prompt=row["prompt"], speech=[clip], target=reference, answer=answer, task=task, meta=meta
    )


def _is_plain(value: Any) -> bool:
    """JSON-able without conversion (VoiceBench metadata: strings, numbers, lists/dicts of them)."""
    if value is None or isinstance(value, str | int | float | bool):
        return not isinstance(value, float) or np.isfinite(value)
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item) for key, item in value.items())
    return False


def _voicebench_files(path: Path) -> list[tuple[Path, str, str]]:
    """(file, subset, split) for a Parquet file or every Parquet file under a directory.

    The HF layout is `<subset>/<split>-00000-of-00001.parquet`; a lone `<subset>.parquet` is read as split `test`.
    """
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise UserError(f"{path}: no .parquet files found")
    named = []
    for file in files:
        parent, stem = file.parent.name, file.stem.split("-")[0]
        if parent not in _VOICEBENCH_TASKS and stem in _VOICEBENCH_TASKS:
            named.append((file, stem, "test"))
        else:
            named.append((file, parent, stem))
    return named


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------


def iter_source(
    settings: SourceSettings,
    root: str | Path,
    audio_writer: AudioWriter | None = None,
    limits: TextLimits = TextLimits(),
    max_audio_seconds: float = 30.0,
) -> Iterator[PairedRecord | Reject]:
    """Records and rejects of the configured source, in source order (no dedup, no limit: see read_source)."""
    try:
        kind = SourceKind(settings.kind)
    except ValueError:
        known = ", ".join(k.value for k in SourceKind)
        raise UserError(f"source.kind: '{settings.kind}' is not one of {known}") from None
    if kind is SourceKind.DEMO:
        yield from (question.to_record() for question in load_demo_questions())
        return
    path = Path(settings.path)
    if not settings.path or not path.exists():
        raise UserError(
            f"source.path: '{settings.path}' does not exist (needed for source.kind={kind.value})"
        )
    if kind is SourceKind.VOICEBENCH:
        writer = audio_writer or FlacAudioWriter(root, "audio/voicebench")
        for file, subset, split in _voicebench_files(path):
            for index, item in enumerate(iter_parquet_rows(file, ("prompt", "audio"))):
                if isinstance(item, Reject):
                    yield item
                    continue
                yield voicebench_row_to_record(
                    item[0], item[1], subset=subset, split=split, index=index, audio_writer=writer,
                    max_seconds=max_audio_seconds, limits=limits,
                )  # fmt: skip
        return
    fields = OPENORCA_FIELDS if kind is SourceKind.OPENORCA else FieldMap.from_settings(settings)
    columns = (fields.id_field, fields.prompt_field, fields.target_field, fields.system_field)
    use_parquet = kind is SourceKind.PARQUET or (kind is SourceKind.OPENORCA and path.suffix == ".parquet")
    rows = iter_parquet_rows(path, columns) if use_parquet else iter_jsonl_rows(path)
    for item in rows:
        yield (
            item if isinstance(item, Reject) else row_to_record(item[0], item[1], fields, kind.value, limits)
        )


def read_source(
    settings: SourceSettings,
    root: str | Path,
    rejects: RejectsLog,
    audio_writer: AudioWriter | None = None,
    limits: TextLimits = TextLimits(),
    max_audio_seconds: float = 30.0,
) -> list[PairedRecord]:
    """Every `settings.every`-th good record of the source, at most `settings.limit` (0 = all); bad ones go to `rejects`.

    A repeated id is rejected (the first one wins). If nothing usable is read, a UserError says why.
    """
    records: list[PairedRecord] = []
    seen: set[str] = set()
    for item in iter_source(settings, root, audio_writer, limits, max_audio_seconds):
        if isinstance(item, Reject):
            rejects.add_reject(item)
        elif item.id in seen:
            rejects.add(item.id, "id", "duplicate id", "an earlier item has the same id")
        else:
            seen.add(item.id)
            if (len(seen) - 1) % settings.every:  # a balanced subset: every n-th good item, not the first n
                continue
            records.append(item)
            if settings.limit and len(records) >= settings.limit:
                break
    if not records:
        raise UserError(f"source {settings.kind} '{settings.path}': no usable items ({rejects.summary()})")
    return records
