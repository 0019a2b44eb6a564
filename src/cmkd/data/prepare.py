"""`cmkd prepare`: text questions -> paired text/speech records with teacher targets, resumable and shardable.

    1 read source   2 speakable   3 teacher ŷ (+ top-k rows)   4 TTS per voice   5 ASR round trip
    6 encoder features   7 manifests (train.jsonl, heldout.jsonl), rejects.jsonl, teacher_logits/, stats

Stages 1-2 are cheap pure functions of the source and run every time. Stages 3-6 record each finished item in a
work log with a fingerprint of its inputs (`prepare_work`), skip what is done, and load their model only when
something is left, so re-running the same command resumes a killed run and a finished re-run is a no-op.
Stage 7 rebuilds every output from the logs (`prepare_assemble`), sorted by id, so a kill at any moment followed
by a re-run gives byte-identical manifests to an uninterrupted run.

Sharding (`shard: i/n`): a shard processes the items whose id hashes into it and writes only its own work
directory; it writes no manifests. A final run without sharding processes whatever no shard finished and
assembles everything; `merge=True` (`cmkd prepare --merge`) only assembles and refuses if a shard is incomplete.
Runs on the same data root must not overlap in time, except shards of one configuration.

Decisions: a record whose clips were all rejected stays in its manifest with `speech: []` (the T→T channel can
still use its text query and teacher response; the S→T channel skips it). Records that arrive with audio
(VoiceBench) keep it as is: no TTS, no ASR check (it is the benchmark's own speech), features computed.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from rich.console import Console

from cmkd.data.audio import TARGET_SAMPLE_RATE
from cmkd.data.features import FeatureSettings
from cmkd.data.jsonl_io import Reject, RejectsLog, atomic_write_bytes, atomic_write_text
from cmkd.data.prepare_assemble import (
    Assembly,
    build_teacher_cache,
    check_existing_cache,
    collect,
    write_outputs,
)
from cmkd.data.prepare_plan import Judge, check_voices, effective_system, plan_clips, teacher_settings_fp
from cmkd.data.prepare_stages import (
    PrepareBackends,
    StageContext,
    run_asr,
    run_features,
    run_teacher,
    run_tts,
)
from cmkd.data.prepare_stats import PrepareStats, clip_counts, voice_stats
from cmkd.data.prepare_work import WORK_DIR, WorkLog, assign_split, in_shard, shard_tag
from cmkd.data.records import PairedRecord
from cmkd.data.sources import read_source, safe_file_stem
from cmkd.data.speakable import speakable_records
from cmkd.errors import UserError
from cmkd.stage_configs import PrepareConfig, parse_shard
from cmkd.torch_threads import restores_torch_threads

__all__ = ["FeatureSettings", "PrepareBackends", "PrepareStats", "run_prepare"]

STAGE_LOGS = ("teacher", "tts", "asr", "features")


class _StableFlacWriter:
    """Stores VoiceBench audio like `sources.FlacAudioWriter`, but leaves an identical existing file untouched,
    so reading the source again on a re-run rewrites nothing."""

    def __init__(self, root: Path, subdir: str = "audio/voicebench") -> None:
        self.root = root
        self.subdir = subdir

    def __call__(self, item_id: str, samples: np.ndarray, sr: int) -> str:
        relative = f"{self.subdir}/{safe_file_stem(item_id)}.flac"
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(samples, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
        data, target = buffer.getvalue(), self.root / relative
        if not (target.is_file() and target.read_bytes() == data):
            atomic_write_bytes(target, data)
        return relative


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 2)


def _check_settings(cfg: PrepareConfig, heldout_fraction: float) -> None:
    check_voices(cfg.tts.voices)
    if cfg.data.sample_rate != TARGET_SAMPLE_RATE:
        raise UserError(
            f"data.sample_rate: prepare writes {TARGET_SAMPLE_RATE} Hz clips (the Whisper encoder's rate), "
            f"got {cfg.data.sample_rate}"
        )
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction}")


@restores_torch_threads
def run_prepare(
    cfg: PrepareConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    merge: bool = False,
    features: FeatureSettings | None = None,
    heldout_fraction: float = 0.1,
    backends: PrepareBackends | None = None,
) -> PrepareStats:
    """Run (or resume) the preparation of `cfg.data.root`; return what it made.

    progress: rich progress bars, stage lines and the final tables. merge: only assemble the shards' work (no
    model is loaded). features: the encoder feature cache (default: on, whisper-tiny.en, float32).
    heldout_fraction: share of items held out when the source names no split (hashed by id).
    backends: the models to use (default: the embedded ones), for tests and custom setups.
    """
    features = features if features is not None else FeatureSettings()
    backends = (backends if backends is not None else PrepareBackends()).resolved(features)
    console = Console(quiet=not progress, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # a log file gets whole table cells, not "hibar…"
    shard_index, shard_count = parse_shard(cfg.shard)
    if merge and shard_count != 1:
        raise UserError(f"--merge assembles every shard's work; drop shard={cfg.shard}")
    _check_settings(cfg, heldout_fraction)
    root = Path(cfg.data.root)
    if cfg.teacher.logits_top_k > 0:
        check_existing_cache(root, cfg)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    timings: dict[str, float] = {}

    with _timed(timings, "read"):
        source_rejects = RejectsLog()
        read = read_source(
            cfg.source,
            root,
            source_rejects,
            _StableFlacWriter(root),
            max_audio_seconds=cfg.data.max_audio_seconds,
        )
        n_source_rejects = source_rejects.total
        records = [
            replace(r, system=effective_system(r, cfg.teacher))
            for r in speakable_records(read, source_rejects)
        ]
        splits = {record.id: assign_split(record, heldout_fraction) for record in records}
        mine = [record for record in records if in_shard(record.id, shard_index, shard_count)]
    console.print(
        f"read: {len(read)} items from source '{cfg.source.kind}' ({n_source_rejects} rejected), "
        f"{len(records)} speakable, {len(mine)} in shard {cfg.shard}"
    )

    work_dir = root / WORK_DIR
    tag = shard_tag(shard_index, shard_count)
    logs = {stage: WorkLog(work_dir, stage, tag) for stage in STAGE_LOGS}
    teacher_fp = teacher_settings_fp(cfg.teacher, cfg.run.seed)
    judge = Judge(cfg, root, logs, backends.asr_name, features)
    ctx = StageContext(cfg, root, work_dir, tag, judge, backends, features, teacher_fp, progress, console)
    if not merge:
        with _timed(timings, "teacher"):
            run_teacher(ctx, mine)
        answered = [r for r in mine if (t := judge.teacher(r, teacher_fp, work_dir)).row and not t.reject]
        plans = [
            plan for record in answered for plan in plan_clips(record, splits[record.id], cfg.tts.voices)
        ]
        with _timed(timings, "tts"):
            run_tts(ctx, plans)
        with _timed(timings, "asr"):
            run_asr(ctx, plans)
        with _timed(timings, "features"):
            run_features(ctx, plans)

    final = shard_count == 1
    with _timed(timings, "assemble"):
        assembly = collect(records if final else mine, splits, judge, cfg, work_dir, teacher_fp)
        cache_info = None
        if final:
            _require_complete(assembly, merge)
            write_outputs(root, cfg, assembly, source_rejects.rejects)
            if cfg.teacher.logits_top_k > 0:
                cache_info = build_teacher_cache(root, work_dir, teacher_fp, assembly)

    # The source's rejects belong to the final summary; a shard's summary covers its own items only.
    rejects = [*source_rejects.rejects, *assembly.rejects] if final else assembly.rejects
    stats = _stats(
        cfg, assembly, rejects, (len(read), n_source_rejects, len(records), len(mine)), ctx, timings
    )
    if cache_info is not None:
        stats.teacher_cache = cache_info.to_json()
    _write_stats(stats, root if final else work_dir / tag, run_dir if final else None)
    stats.print(console)
    if not final:
        console.print(
            f"shard {cfg.shard} done; assemble with `cmkd prepare CONFIG --merge` once all shards are"
        )
    return stats


def _require_complete(assembly: Assembly, merge: bool) -> None:
    missing = {stage: count for stage, count in assembly.missing.items() if count}
    if not missing:
        return
    summary = ", ".join(f"{stage}: {count}" for stage, count in missing.items())
    if merge:
        raise UserError(
            f"--merge: not every item is prepared yet ({summary} unfinished); finish the missing shards, or run "
            "without --merge and without shard= to prepare the rest here"
        )
    raise RuntimeError(f"internal: stages ran but left work unfinished ({summary})")


def _stats(
    cfg: PrepareConfig,
    assembly: Assembly,
    rejects: list[Reject],
    sizes: tuple[int, int, int, int],
    ctx: StageContext,
    timings: dict[str, float],
) -> PrepareStats:
    """sizes: items read, rejected by the source reader, speakable, in this shard."""
    n_read, n_source_rejects, n_speakable, n_mine = sizes
    final = parse_shard(cfg.shard)[1] == 1
    clips = clip_counts(assembly)
    records: list[PairedRecord] = assembly.records
    counts = {"source items read": n_read, "source rejects": n_source_rejects, "speakable": n_speakable}
    if not final:
        counts["in this shard"] = n_mine
    counts.update({
        "teacher responses": assembly.answered,
        "clips synthesised": clips["synthesised"],
        "clips checked by ASR": clips["checked"],
        "clips with features": clips["kept"] if ctx.features.enabled else 0,
        "train records": len(assembly.train),
        "heldout records": len(assembly.heldout),
        "records without speech": sum(1 for record in records if not record.speech),
    })  # fmt: skip
    reasons = Counter(reject.reason for reject in rejects)
    return PrepareStats(
        shard=cfg.shard,
        manifests_written=final,
        counts=counts,
        generated={stage: ctx.generated.get(stage, 0) for stage in STAGE_LOGS},
        timings_s=timings,
        voices=[voice.to_json() for voice in voice_stats(assembly)],
        truncated_responses=sum(1 for record in records if record.teacher_truncated),
        rejects_by_reason=dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        missing={stage: count for stage, count in assembly.missing.items() if count},
    )


def _write_stats(stats: PrepareStats, directory: Path, run_dir: Path | None) -> None:
    targets = [directory] + (
        [run_dir] if run_dir is not None and Path(run_dir).resolve() != directory.resolve() else []
    )
    for target in targets:
        atomic_write_text(
            target / "stats.json", json.dumps(stats.to_json(), indent=2, ensure_ascii=False) + "\n"
        )
        atomic_write_text(target / "stats.md", stats.to_markdown())
