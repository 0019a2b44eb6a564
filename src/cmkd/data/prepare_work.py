"""Per-item bookkeeping of `cmkd prepare`: fingerprints, shard and split assignment, and the stage work logs.

Why this shape: prepare runs for a long time, can be killed at any byte, and is resumed by re-running the same
command. Every stage therefore records each finished item as one line in an append-only JSONL work log
(`<root>/work/<shard>/<stage>.jsonl`, written with `append_jsonl`: whole lines, fsync'd, so a kill leaves at
most one partial last line, which the reader skips). A row names the item (`key`), the fingerprint of
everything its output depends on (`fp`: the stage's settings plus the item's content), and the result. An
item counts as done only when a row with the *current* fingerprint says so (and, checked by the stage, its
output file exists), so a changed setting or an edited question is redone, and nothing else is.

Each shard appends only to its own directory, so `--shard i/n` processes never write the same file; every
reader looks at all shards' logs, which is how a final unsharded run (or `--merge`) picks up their work.
Failed items are recorded too (`ok: false`, with field and reason) so the rejects file can say why; they are
retried on the next run, because a failure may have been transient (a missing binary since installed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cmkd.data.jsonl_io import ParseError, Reject, append_jsonl, read_jsonl
from cmkd.data.records import PairedRecord

WORK_DIR = "work"
SPLITS = ("train", "heldout")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dict keys sorted): equal inputs, equal fingerprint, on any machine."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unit_interval(salt: str, item_id: str) -> float:
    """A uniform number in [0, 1) from the id alone: the same on every run, machine and shard count."""
    digest = hashlib.sha256(f"{salt}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def shard_tag(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def in_shard(item_id: str, index: int, count: int) -> bool:
    """Whether shard `index` of `count` owns this item (a stable hash of the id, not its position in the source)."""
    return count == 1 or int(_unit_interval("shard", item_id) * count) == index


def assign_split(record: PairedRecord, heldout_fraction: float) -> str:
    """'train' or 'heldout'.

    A source that names the split (the demo set: `meta["split"]`) decides; VoiceBench is an evaluation suite,
    so all of it is held out (training on it would contaminate the benchmark); anything else goes by a hash of
    the id, so the split never changes when items are added, removed or reordered.
    """
    named = record.meta.get("split")
    if named in SPLITS:
        return str(named)
    if record.meta.get("source") == "voicebench":
        return "heldout"
    return "heldout" if _unit_interval("heldout", record.id) < heldout_fraction else "train"


class WorkLog:
    """One stage's results across all shards, plus appends to this shard's own log.

    `ok_row(key, fp)` / `failed_row(key, fp)` give the latest success / failure recorded for that key under that
    fingerprint (rows with another fingerprint are stale and ignored). A success is never hidden by a failure:
    failures are only recorded for items that were not done.
    """

    def __init__(self, work_dir: Path, stage: str, own_shard: str) -> None:
        self.stage = stage
        self.path = work_dir / own_shard / f"{stage}.jsonl"
        self._ok: dict[tuple[str, str], dict[str, Any]] = {}
        self._failed: dict[tuple[str, str], dict[str, Any]] = {}
        self.damaged_lines = 0
        for path in sorted(work_dir.glob(f"*/{stage}.jsonl")):
            for _, row in read_jsonl(path):
                if isinstance(row, ParseError) or not _well_formed(row):
                    self.damaged_lines += 1  # a line cut by a kill: that item simply is not done
                    continue
                row["shard"] = path.parent.name
                self._remember(row)

    def _remember(self, row: dict[str, Any]) -> None:
        key = (row["key"], row["fp"])
        if row["ok"]:
            self._ok[key] = row
            self._failed.pop(key, None)
        elif key not in self._ok:
            self._failed[key] = row

    def ok_row(self, key: str, fp: str) -> dict[str, Any] | None:
        return self._ok.get((key, fp))

    def failed_row(self, key: str, fp: str) -> dict[str, Any] | None:
        return self._failed.get((key, fp))

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record finished items: one write + fsync for the whole batch, then they count as done."""
        append_jsonl(self.path, rows)
        for row in rows:
            self._remember({**row, "shard": self.path.parent.name})


def _well_formed(row: dict[str, Any]) -> bool:
    return (
        isinstance(row.get("key"), str) and isinstance(row.get("fp"), str) and isinstance(row.get("ok"), bool)
    )


def ok_row(key: str, fp: str, **result: Any) -> dict[str, Any]:
    return {"key": key, "fp": fp, "ok": True, **result}


def failed_row(key: str, fp: str, item_id: str, field: str, reason: str, detail: str) -> dict[str, Any]:
    return {
        "key": key,
        "fp": fp,
        "ok": False,
        "item_id": item_id,
        "field": field,
        "reason": reason,
        "detail": detail[:500],
    }


def reject_of(row: dict[str, Any]) -> Reject:
    """The rejects-file entry of a failure row."""
    return Reject(str(row["item_id"]), str(row["field"]), str(row["reason"]), str(row.get("detail", "")))


def progress_bar(enabled: bool) -> Progress:
    """The bar every long prepare stage shows: what, how many of how many, elapsed, and the ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
