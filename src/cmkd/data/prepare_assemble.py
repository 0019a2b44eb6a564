"""The last prepare stage: work logs -> manifests, the rejects file and the teacher logit cache.

Why everything is rebuilt from the logs each time: the outputs are then a pure function of (records, settings,
work logs), sorted by id, so a run that was killed and resumed writes byte-identical files to one that never
stopped, and a merge of shards equals an unsharded run's assembly. Each file is replaced atomically; a kill
between two of them leaves a mix of old and new whole files, and the next run rewrites them all.

The teacher cache (`<root>/teacher_logits/`, the layout of `cmkd.data.logit_cache`) is copied out of the shards'
work directories for exactly the records in the manifests, in id order, so it holds no stale rows from earlier
settings or killed runs. It is rebuilt only when its inputs changed (`build.json`), and swapped in whole.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cmkd.data.jsonl_io import Reject, atomic_write_bytes, atomic_write_text, dumps_line
from cmkd.data.logit_cache import CacheMeta, LogitCacheWriter, read_meta
from cmkd.data.prepare_plan import ClipState, Judge, plan_clips, topk_dir
from cmkd.data.prepare_work import fingerprint
from cmkd.data.records import PairedRecord, write_manifest
from cmkd.errors import UserError
from cmkd.stage_configs import PrepareConfig

TEACHER_CACHE_DIR = "teacher_logits"
REJECTS_FILE = "rejects.jsonl"
_CACHE_SHARD_ITEMS = 256


@dataclass
class Assembly:
    """The prepared data of a set of records, before anything is written."""

    train: list[PairedRecord] = field(default_factory=list)
    heldout: list[PairedRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    clips: list[tuple[str, ClipState]] = field(default_factory=list)  # (split, state) of every planned clip
    missing: Counter[str] = field(default_factory=Counter)  # stage -> items or clips it has not done yet
    teacher_rows: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # id -> teacher row, manifest records
    answered: int = 0  # records the teacher answered (empty answers included)

    @property
    def records(self) -> list[PairedRecord]:
        return self.train + self.heldout


def collect(
    records: list[PairedRecord],
    splits: dict[str, str],
    judge: Judge,
    cfg: PrepareConfig,
    work_dir: Path,
    teacher_fp: str,
) -> Assembly:
    """Decide every record's fate from the logs. A record is in a manifest when the teacher answered it and every
    clip it should have is finished; rejected clips are dropped from it, and a record left without any clip is
    KEPT (speech []): it still serves the T→T channel, while the S→T channel skips it."""
    assembly = Assembly()
    for record in sorted(records, key=lambda r: r.id):
        teacher = judge.teacher(record, teacher_fp, work_dir)
        assembly.answered += teacher.row is not None
        if teacher.reject is not None:
            assembly.rejects.append(teacher.reject)
            continue
        if teacher.row is None:
            assembly.missing["teacher"] += 1
            continue
        split = splits[record.id]
        kept, complete = [], True
        for plan in plan_clips(record, split, cfg.tts.voices):
            state = judge.clip(plan, with_features=True)
            assembly.clips.append((split, state))
            if state.missing:
                assembly.missing[state.missing] += 1
                complete = False
            elif state.reject is not None:
                assembly.rejects.append(state.reject)
            else:
                kept.append(state.speech_clip())
        if not complete:
            continue
        row = teacher.row
        final = replace(
            record,
            speech=kept,
            teacher_response=row["response"],
            teacher_response_ids=list(row["response_ids"]),
            teacher_truncated=bool(row["truncated"]),
        )
        (assembly.train if split == "train" else assembly.heldout).append(final)
        assembly.teacher_rows[record.id] = row
    return assembly


def write_outputs(root: Path, cfg: PrepareConfig, assembly: Assembly, source_rejects: list[Reject]) -> None:
    """Manifests and the rejects file, each replaced atomically."""
    write_manifest(root / cfg.data.train_manifest, assembly.train)
    write_manifest(root / cfg.data.eval_manifest, assembly.heldout)
    rejects = [*source_rejects, *assembly.rejects]
    atomic_write_bytes(root / REJECTS_FILE, b"".join(dumps_line(reject.to_json()) for reject in rejects))


# ---------------------------------------------------------------------------------------------------------------
# The teacher logit cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInfo:
    items: int
    rows: int  # response tokens + one end-of-turn row per item
    bytes: int  # of the tensor files
    meta: CacheMeta

    def to_json(self) -> dict[str, Any]:
        per_row = self.bytes / self.rows if self.rows else 0.0
        return {"items": self.items, "rows": self.rows, "bytes": self.bytes, "bytes_per_token": round(per_row, 1),
                "k": self.meta.k, "temperature": self.meta.temperature, "teacher": self.meta.teacher}  # fmt: skip


def check_existing_cache(root: Path, cfg: PrepareConfig) -> None:
    """Refuse to replace a cache made with another teacher, k or τ unless the user said so (--overwrite):
    a training run may be using it."""
    directory = root / TEACHER_CACHE_DIR
    if not (directory / "meta.json").is_file() or cfg.run.overwrite:
        return
    found = read_meta(directory)
    wanted = {
        "teacher": cfg.teacher.model,
        "k": cfg.teacher.logits_top_k,
        "temperature": cfg.teacher.logits_temperature,
    }
    for name, value in wanted.items():
        if getattr(found, name) != value:
            raise UserError(
                f"logit cache '{directory}': made with {name}={getattr(found, name)!r}, this run has {value!r}; "
                "pass --overwrite (run.overwrite=true) to rebuild it, or use another data.root"
            )


def build_teacher_cache(root: Path, work_dir: Path, teacher_fp: str, assembly: Assembly) -> CacheInfo:
    refs = [
        (item_id, row["shard"], row["topk"], int(row["topk_row"]), len(row["response_ids"]) + 1)
        for item_id, row in sorted(assembly.teacher_rows.items())
    ]
    metas = {read_meta(topk_dir(work_dir, shard, teacher_fp)) for shard in sorted({ref[1] for ref in refs})}
    if len(metas) != 1:
        raise UserError(
            f"{work_dir}: shards cached teacher rows with different tokenizers or vocabularies ({len(metas)} kinds); "
            "the teacher model changed between shard runs; delete the work dir and prepare again"
        )
    meta = metas.pop()
    target = root / TEACHER_CACHE_DIR
    build_fp = fingerprint(asdict(meta), refs)
    build_file = target / "build.json"
    if (
        build_file.is_file()
        and json.loads(build_file.read_text(encoding="utf-8")).get("fingerprint") == build_fp
    ):
        return _cache_info(target, meta, refs)
    staging = root / f".{TEACHER_CACHE_DIR}.building"
    shutil.rmtree(staging, ignore_errors=True)
    writer = LogitCacheWriter(staging, meta)
    loaded: dict[Path, dict[str, torch.Tensor]] = {}
    for start in range(0, len(refs), _CACHE_SHARD_ITEMS):
        chunk = refs[start : start + _CACHE_SHARD_ITEMS]
        rows = []
        for item_id, shard, file_name, position, n_rows in chunk:
            path = topk_dir(work_dir, shard, teacher_fp) / file_name
            if path not in loaded:
                loaded[path] = load_file(str(path))
            tensors = loaded[path]
            begin, end = int(tensors["offsets"][position]), int(tensors["offsets"][position + 1])
            if end - begin != n_rows:
                raise RuntimeError(
                    f"internal: {item_id}: {end - begin} cached rows for {n_rows} response rows"
                )
            rows.append((tensors["ids"][begin:end], tensors["logprobs"][begin:end]))  # n+1, k each
        writer.write([ref[0] for ref in chunk], rows)
    atomic_write_text(staging / "build.json", json.dumps({"fingerprint": build_fp}) + "\n")
    old = root / f".{TEACHER_CACHE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return _cache_info(target, meta, refs)


def _cache_info(target: Path, meta: CacheMeta, refs: list[tuple[str, str, str, int, int]]) -> CacheInfo:
    size = sum(path.stat().st_size for path in target.glob("shard-*.safetensors"))
    return CacheInfo(items=len(refs), rows=sum(ref[4] for ref in refs), bytes=size, meta=meta)
