"""Evaluation suites: which items are asked, as text and as speech, and how each answer is scored.

A suite is a list of `EvalItem`s: a paired record (the question as text plus its spoken clips), the subset it
counts in (the column of the summary table) and the scorer its answers go through. Three sources:

- `demo`: the held-out manifest `cmkd prepare` writes (`data.root / data.eval_manifest`). It must exist: the
  eval never synthesises speech itself, so the audio a model hears is exactly the audio prepare checked (ASR
  round trip) and the same on every re-run. Subsets are the question categories.
- `voicebench` / `voicebench:mmsu,bbh` / `voicebench:sd-qa/aus`: VoiceBench parquet files in the published
  layout (`<dir>/<subset>/<split>-00000-of-00001.parquet`). Embedded audio is decoded once into FLAC files under
  the run directory (a cached manifest per file), so re-runs and resumes neither re-decode nor hold thousands of
  clips in memory.
- a path to any paired JSONL/Parquet manifest; audio paths resolve against its directory (or `data.root` when
  the manifest lives under it).

Each item names its scorer (`ScoringKind`, from the record's `task`; VoiceBench subsets map to their evaluators);
`cmkd.eval.item_scoring` applies it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress

from cmkd.config import StrEnum
from cmkd.data.jsonl_io import ParseError, Reject, atomic_write_text, dumps_line, read_jsonl
from cmkd.data.records import (
    PairedRecord,
    SpeechClip,
    read_manifest,
    resolve_audio_path,
    resolve_manifest_path,
    write_manifest,
)
from cmkd.data.sources import FlacAudioWriter, iter_parquet_rows, voicebench_row_to_record
from cmkd.errors import UserError


class ScoringKind(StrEnum):
    """How one item's answer is scored (the record's `task`, or VoiceBench's evaluator for its subset)."""

    SHORT_ANSWER = "short_answer"  # gold anywhere in the response (lenient) / in its first sentence (strict)
    MCQ = "mcq"
    BINARY = "binary"  # bbh: yes/no or (A)/(B)
    IFEVAL = "ifeval"
    REFUSAL = "refusal"  # advbench: refusing is correct
    REFERENCE_QA = "ref_qa"  # sd-qa, offline: the reference occurs in the response
    OPEN = "open"  # judge-rated 1-5
    AGREEMENT = "agreement"  # no gold at all: agreement with the teacher's text answer


_KIND_OF_TASK = {kind.value: kind for kind in ScoringKind}

VOICEBENCH_SCORING: dict[str, ScoringKind] = {
    "alpacaeval": ScoringKind.OPEN,
    "alpacaeval_full": ScoringKind.OPEN,
    "alpacaeval_speaker": ScoringKind.OPEN,
    "commoneval": ScoringKind.OPEN,
    "wildvoice": ScoringKind.OPEN,
    "sd-qa": ScoringKind.REFERENCE_QA,
    "openbookqa": ScoringKind.MCQ,
    "mmsu": ScoringKind.MCQ,
    "bbh": ScoringKind.BINARY,
    "ifeval": ScoringKind.IFEVAL,
    "advbench": ScoringKind.REFUSAL,
}
VOICEBENCH_DEFAULT_SUBSETS = tuple(
    ["alpacaeval_full", "commoneval", "wildvoice", "sd-qa", "mmsu", "openbookqa", "bbh", "ifeval", "advbench"]
)
"""The nine columns of VoiceBench's current leaderboard; `voicebench` alone means these."""
SDQA_DEFAULT_SPLIT = "usa"


def voice_key(clip: SpeechClip) -> str:
    """A file-name-safe name for a clip's voice: `hibari`, `espeak-en-us+m3`, `human-usa`."""
    raw = f"{clip.source}-{clip.voice}" if clip.voice else clip.source
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw).strip("._") or "voice"


@dataclass(frozen=True)
class EvalItem:
    """One question of a suite: the record, its summary subset, its scorer, and where its audio paths resolve."""

    record: PairedRecord
    subset: str
    scoring: ScoringKind
    audio_root: Path

    @property
    def id(self) -> str:
        return self.record.id

    def clips(self) -> dict[str, SpeechClip]:
        """Clips by voice key, in manifest order; a repeated voice gets a `#2` suffix instead of hiding one."""
        by_voice: dict[str, SpeechClip] = {}
        for clip in self.record.speech:
            key, copy_number = voice_key(clip), 2
            while key in by_voice:
                key = f"{voice_key(clip)}#{copy_number}"
                copy_number += 1
            by_voice[key] = clip
        return by_voice

    def clip_path(self, voice: str) -> Path:
        return resolve_audio_path(self.audio_root, self.clips()[voice].audio, self.id)


@dataclass
class Suite:
    """The items to evaluate, plus what was left out and why (never silently)."""

    name: str
    items: list[EvalItem]
    skipped_subsets: dict[str, str] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def subsets(self) -> list[str]:
        return list(dict.fromkeys(item.subset for item in self.items))


def scoring_for(record: PairedRecord) -> ScoringKind:
    """The scorer a record's `task` names; without one, gold matching if there is a gold, else agreement."""
    if record.task in _KIND_OF_TASK:
        return _KIND_OF_TASK[record.task]
    if record.answer and record.choices:
        return ScoringKind.MCQ
    if record.target:
        return ScoringKind.SHORT_ANSWER
    return ScoringKind.AGREEMENT


def subset_of(record: PairedRecord) -> str:
    """VoiceBench subset, else the record's category, else its task, else 'all'."""
    subset = record.meta.get("subset")
    if isinstance(subset, str) and subset:
        return subset
    return record.category or record.task or "all"


def _items_from_manifest(path: Path, audio_root: Path) -> list[EvalItem]:
    return [
        EvalItem(record, subset_of(record), scoring_for(record), audio_root) for record in read_manifest(path)
    ]


# ---------------------------------------------------------------------------------------------------------------
# VoiceBench in its published layout
# ---------------------------------------------------------------------------------------------------------------


def _voicebench_parquet_files(root: Path, subset: str) -> dict[str, Path]:
    """{split: file} for one subset: `<subset>/<split>-00000-of-00001.parquet` or `<subset>/<split>/0000.parquet`."""
    directory = root / subset
    files: dict[str, Path] = {}
    for file in sorted(directory.rglob("*.parquet")) if directory.is_dir() else []:
        stem = file.stem.split("-")[0]
        split = file.parent.name if stem.isdigit() and file.parent != directory else stem
        if split in files:
            raise UserError(f"{directory}: two parquet files for split '{split}' ({files[split]}, {file})")
        files[split] = file
    return files


def _parse_voicebench_spec(spec: str) -> list[tuple[str, str | None]]:
    """'voicebench' -> the default subsets; 'voicebench:mmsu,sd-qa/aus' -> [(mmsu, None), (sd-qa, aus)]."""
    _, _, wanted = spec.partition(":")
    if not wanted.strip():
        return [(subset, None) for subset in VOICEBENCH_DEFAULT_SUBSETS]
    parsed = []
    for part in wanted.split(","):
        subset, _, split = part.strip().partition("/")
        if subset not in VOICEBENCH_SCORING:
            raise UserError(
                f"eval.suite: VoiceBench subset '{subset}' is unknown or has no offline scorer here; "
                f"known: {', '.join(VOICEBENCH_SCORING)}"
            )
        parsed.append((subset, split or None))
    return parsed


def _extract_voicebench_file(
    file: Path, subset: str, split: str, cache_root: Path, limit: int, max_seconds: float, progress: bool
) -> tuple[list[PairedRecord], list[Reject]]:
    """Decode one parquet file's audio into FLAC under `cache_root` once; later calls read the cached manifest."""
    suffix = f".limit{limit}" if limit else ""
    manifest = cache_root / "manifests" / subset / f"{split}{suffix}.jsonl"
    rejects_file = manifest.with_suffix(".rejects.jsonl")
    if manifest.is_file():
        rejects = [Reject(**row) for _, row in read_jsonl(rejects_file) if not isinstance(row, ParseError)]
        return read_manifest(manifest), rejects
    writer = FlacAudioWriter(cache_root, f"audio/{subset}/{split}")
    records: list[PairedRecord] = []
    rejects = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"decoding VoiceBench {subset}/{split}", total=None)
        for index, row in enumerate(iter_parquet_rows(file, ("prompt", "audio"))):
            bar.advance(task)
            if isinstance(row, Reject):
                rejects.append(row)
                continue
            raw_id, fields = row
            converted = voicebench_row_to_record(
                raw_id,
                fields,
                subset=subset,
                split=split,
                index=index,
                audio_writer=writer,
                max_seconds=max_seconds,
            )
            if isinstance(converted, Reject):
                rejects.append(converted)
            else:
                records.append(converted)
            if limit and len(records) >= limit:
                break
    # Rejects first, manifest last (atomic): the manifest's existence means the extraction finished.
    atomic_write_text(rejects_file, "".join(dumps_line(r.to_json()).decode("utf-8") for r in rejects))
    write_manifest(manifest, records)
    return records, rejects


def load_voicebench(
    spec: str,
    voicebench_dir: str,
    cache_root: Path,
    *,
    limit: int = 0,
    max_seconds: float = 30.0,
    progress: bool = True,
    judge_skip_reason: Callable[[], str | None] | None = None,
) -> Suite:
    """VoiceBench subsets from local parquet files; subsets not found are recorded as skipped, not fatal.

    `judge_skip_reason()` says why judge-scored subsets cannot be scored (None: they can); such subsets are
    skipped before their audio is decoded."""
    if not voicebench_dir:
        raise UserError(
            "eval.voicebench_dir: required for a voicebench suite (the local VoiceBench download)"
        )
    root = Path(voicebench_dir)
    if not root.is_dir():
        raise UserError(f"eval.voicebench_dir: '{root}' is not a directory")
    suite = Suite(spec, [])
    for subset, wanted_split in _parse_voicebench_spec(spec):
        files = _voicebench_parquet_files(root, subset)
        judge_problem = (
            judge_skip_reason()
            if judge_skip_reason and VOICEBENCH_SCORING[subset] is ScoringKind.OPEN
            else None
        )
        if judge_problem:
            suite.skipped_subsets[subset] = judge_problem
            continue
        if not files:
            suite.skipped_subsets[subset] = f"no parquet files under {root / subset}"
            continue
        split = wanted_split or (SDQA_DEFAULT_SPLIT if subset == "sd-qa" else None)
        if split is not None and split not in files:
            raise UserError(f"eval.suite: {subset} has no split '{split}'; found: {', '.join(files)}")
        for split_name, file in files.items():
            if split is not None and split_name != split:
                continue
            records, rejects = _extract_voicebench_file(
                file, subset, split_name, cache_root, limit, max_seconds, progress
            )
            suite.rejects.extend(rejects)
            suite.items.extend(
                EvalItem(record, subset, VOICEBENCH_SCORING[subset], cache_root) for record in records
            )
    return suite


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------


def load_suite(
    spec: str,
    *,
    data_root: Path,
    eval_manifest: str,
    voicebench_dir: str = "",
    cache_root: Path,
    limit: int = 0,
    max_audio_seconds: float = 30.0,
    progress: bool = True,
    judge_skip_reason: Callable[[], str | None] | None = None,
) -> Suite:
    """The suite `spec` names (see the module doc); UserError for an unknown name or a suite with no items.

    `limit` keeps the first N items (per VoiceBench subset, or of the manifest): a quick smoke run."""
    if spec == "demo":
        manifest = resolve_manifest_path(data_root, eval_manifest, "data.eval_manifest")
        if not manifest.is_file():
            raise UserError(
                f"eval.suite demo: held-out manifest '{manifest}' not found; run `cmkd prepare` first "
                "(it writes the held-out questions with their speech) or point data.root at its output"
            )
        suite = Suite("demo", _items_from_manifest(manifest, data_root))
    elif spec == "voicebench" or spec.startswith("voicebench:"):
        suite = load_voicebench(
            spec,
            voicebench_dir,
            cache_root / "voicebench",
            limit=limit,
            max_seconds=max_audio_seconds,
            progress=progress,
            judge_skip_reason=judge_skip_reason,
        )
    elif spec.lower().endswith((".jsonl", ".parquet")) and Path(spec).is_file():
        manifest = Path(spec)
        inside_root = manifest.resolve().is_relative_to(data_root.resolve())
        suite = Suite(spec, _items_from_manifest(manifest, data_root if inside_root else manifest.parent))
    else:
        raise UserError(
            f"eval.suite: '{spec}' is not 'demo', 'voicebench[:subset,...]' or an existing .jsonl/.parquet "
            "paired manifest"
        )
    if limit and not spec.startswith("voicebench"):
        suite.items = suite.items[:limit]
    if not suite.items:
        skipped = "; ".join(f"{name}: {why}" for name, why in suite.skipped_subsets.items())
        raise UserError(f"eval.suite '{spec}': no items to evaluate" + (f" ({skipped})" if skipped else ""))
    return suite


def missing_clips(items: Sequence[EvalItem]) -> dict[tuple[str, str], str]:
    """(item id, voice) -> why the clip cannot be played, checked on disk before any model is loaded."""
    missing: dict[tuple[str, str], str] = {}
    for item in items:
        for voice in item.clips():
            try:
                path = item.clip_path(voice)
            except UserError as err:
                missing[(item.id, voice)] = str(err)
                continue
            if not path.is_file():
                missing[(item.id, voice)] = f"audio file not found: {path}"
    return missing


def judge_subsets(items: Sequence[EvalItem]) -> list[str]:
    """Subsets holding at least one judge-scored item (they are skipped as a whole when no judge is usable)."""
    return list(dict.fromkeys(item.subset for item in items if item.scoring is ScoringKind.OPEN))


def drop_subsets(suite: Suite, reasons: Mapping[str, str]) -> None:
    """Remove whole subsets from a suite, recording why."""
    suite.items = [item for item in suite.items if item.subset not in reasons]
    suite.skipped_subsets.update(reasons)
