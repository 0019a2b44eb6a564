"""Prepared demo data for the end-to-end, feature-cache and eval benchmarks: a `cmkd prepare` output, subset.

Why a shared helper: these three benchmarks need what `cmkd prepare` makes (teacher answers ŷ with their top-64
logit cache, hibari speech, the held-out split), which takes minutes to make. `--data DIR` points them at an
existing prepared data root (e.g. the demo's `runs/demo/data`), which is only ever read. Without it they read
`data/demo` (what `cmkd prepare configs/demo.yaml` writes; `make bench` runs that first) when it is there, else
the demo questions are prepared once, with the same config on every `PREPARE_EVERY`-th question, into the cmkd
cache (`$CMKD_CACHE/bench-demo-data`), and reused by every later run (prepare resumes).
Each benchmark then copies the records it uses, their clips and the teacher cache into its own scratch root, so
it can add a feature cache there without touching the source.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmkd.data.records import PairedRecord, read_manifest, write_manifest

PREPARE_EVERY = 4  # 115 of the 460 demo questions (about 90 train, 25 held out): a few minutes of prepare
REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ("train.jsonl", "heldout.jsonl")
TEACHER_CACHE_DIR = "teacher_logits"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ["CMKD_BENCH_DATA"]) if os.environ.get("CMKD_BENCH_DATA") else None,
        help="a prepared data root (train.jsonl, heldout.jsonl, teacher_logits/, audio), only read; default "
        "$CMKD_BENCH_DATA, else data/demo if prepared, else a subset of the demo questions is prepared once into "
        "the cmkd cache (a few minutes)",
    )


def _missing(root: Path) -> list[str]:
    return [name for name in (*MANIFESTS, TEACHER_CACHE_DIR) if not (root / name).exists()]


def prepared_root(data: Path | None) -> Path:
    """`data` if given (checked), else data/demo if prepared, else the benchmarks' own prepared subset."""
    if data is not None:
        if _missing(data):
            raise SystemExit(f"--data {data}: not a prepared data root (missing {', '.join(_missing(data))})")
        return data
    if not _missing(REPO_ROOT / "data" / "demo"):
        return REPO_ROOT / "data" / "demo"
    from cmkd import assets
    from cmkd.config import load_config
    from cmkd.data.prepare import run_prepare
    from cmkd.stage_configs import PrepareConfig

    root = assets.cache_dir() / "bench-demo-data"
    overrides = [f"run.out_dir={root}", f"data.root={root}", f"source.every={PREPARE_EVERY}"]
    cfg = load_config(PrepareConfig, REPO_ROOT / "configs" / "demo.yaml", overrides)
    print(
        f"preparing every {PREPARE_EVERY}th demo question into {root} (once; later runs reuse it)", flush=True
    )
    run_prepare(cfg, root, features=cfg.features, progress=False)
    return root


def spread(records: Sequence[PairedRecord], count: int) -> list[PairedRecord]:
    """Every m-th record: manifests are grouped by category, so a prefix would be one category only."""
    step = max(1, len(records) // max(count, 1))
    return list(records[::step][:count])


def copy_subset(
    source: Path,
    dest: Path,
    manifest: str,
    count: int,
    keep_clip: Callable[[str], bool] = lambda voice: True,
) -> list[PairedRecord]:
    """Copy `count` spread records of `source/manifest` with speech (clips filtered by voice label, e.g.
    'hibari'), their audio files and the teacher logit cache into `dest`; returns the records written."""
    from dataclasses import replace

    records = []
    for record in read_manifest(source / manifest):
        clips = [clip for clip in record.speech if keep_clip(clip.source)]
        if clips:
            records.append(replace(record, speech=clips))
    chosen = spread(records, count)
    for record in chosen:
        for clip in record.speech:
            target = dest / clip.audio
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / clip.audio, target)
    write_manifest(dest / manifest, chosen)
    if not (dest / TEACHER_CACHE_DIR).exists():
        shutil.copytree(source / TEACHER_CACHE_DIR, dest / TEACHER_CACHE_DIR)
    return chosen


def build_feature_cache(root: Path, student: Any, manifests: Sequence[str]) -> tuple[int, float]:
    """Write the feature cache `student` reads for every clip of `manifests` under `root`, with the library's own
    writer and meta, as `cmkd prepare` does for this student's connector: Whisper posteriors (decoded in batches
    of 8, as the prepare stage's ASR check decodes them) for the posterior connector, else encoder frames.
    Returns (clips, seconds spent computing and writing)."""
    from cmkd.data.audio import load_audio
    from cmkd.data.features import encode_clip, write_clip_features, write_feature_meta
    from cmkd.data.speech_inputs import student_feature_meta
    from cmkd.models.posterior import posterior_features
    from cmkd.models.posterior_connector import PosteriorConnector
    from cmkd.stage_configs import DType

    meta, reason = student_feature_meta(student)
    if meta is None:
        raise RuntimeError(f"this student reads no feature cache: {reason}")
    keys = [
        clip.audio
        for manifest in manifests
        for record in read_manifest(root / manifest)
        for clip in record.speech
    ]
    audios = [load_audio(root / key) for key in keys]
    start = time.perf_counter()
    if isinstance(student.projector, PosteriorConnector):
        decoded = posterior_features(audios, student.encoder, student.projector.decoder, batch_size=8)
        tensors = [features.packed() for features in decoded]  # N, 2k + D each
    else:
        tensors = [encode_clip(student.encoder, audio) for audio in audios]  # T_enc, D each
    for key, tensor in zip(keys, tensors, strict=True):
        write_clip_features(root, key, tensor, DType.FLOAT32)
    write_feature_meta(root, meta)
    return len(keys), time.perf_counter() - start
