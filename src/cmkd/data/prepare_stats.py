"""What `cmkd prepare` made: counts per stage, audio hours and WER per voice, truncation, rejects, timings.

Written as `<root>/stats.json` (for scripts) and `<root>/stats.md` (for people), and printed as rich tables.
The counts say where items went, so a user can see at a glance that nothing vanished: every source item is in a
manifest or in the rejects file, and every clip is kept or rejected with a reason.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from cmkd.data.prepare_assemble import Assembly


@dataclass
class VoiceStats:
    label: str  # backend:voice
    splits: str  # which splits it spoke for, e.g. "train+heldout"
    clips: int  # kept in the manifests
    rejected: int
    seconds: float  # of kept clips
    wers: list[float] = field(default_factory=list)  # every clip the ASR check scored, kept or not

    def to_json(self) -> dict[str, Any]:
        return {
            "voice": self.label,
            "splits": self.splits,
            "clips": self.clips,
            "rejected": self.rejected,
            "hours": round(self.seconds / 3600, 4),
            "seconds_per_clip": round(self.seconds / self.clips, 2) if self.clips else None,
            "wer_checked": len(self.wers),
            "wer_mean": _round(statistics.fmean(self.wers)) if self.wers else None,
            "wer_median": _round(statistics.median(self.wers)) if self.wers else None,
            "wer_p90": _round(_quantile(self.wers, 0.9)) if self.wers else None,
        }


def _round(value: float) -> float:
    return round(value, 4)


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy for a handful of numbers."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def voice_stats(assembly: Assembly) -> list[VoiceStats]:
    by_label: dict[str, VoiceStats] = {}
    splits: dict[str, set[str]] = {}
    for split, state in assembly.clips:
        label = state.plan.label
        stats = by_label.setdefault(label, VoiceStats(label, "", 0, 0, 0.0))
        splits.setdefault(label, set()).add(split)
        if state.checked and state.wer is not None:
            stats.wers.append(state.wer)
        if state.reject is not None:
            stats.rejected += 1
        elif not state.missing:
            stats.clips += 1
            stats.seconds += state.seconds
    for label, stats in by_label.items():
        stats.splits = "+".join(sorted(splits[label], key=lambda s: (s != "train", s)))
    return list(by_label.values())


@dataclass
class PrepareStats:
    """The summary `run_prepare` returns (and writes as stats.json / stats.md)."""

    shard: str
    manifests_written: bool
    counts: dict[str, int]  # items (or clips) after each stage, in pipeline order
    generated: dict[str, int]  # items each stage computed in this run (0 everywhere: a no-op re-run)
    timings_s: dict[str, float]  # wall-clock per stage in this run
    voices: list[dict[str, Any]]
    truncated_responses: int
    rejects_by_reason: dict[str, int]
    missing: dict[str, int]  # items or clips a stage has not finished (only non-zero for a partial shard)
    teacher_cache: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def tables(self) -> list[Table]:
        counts = Table(title=f"cmkd prepare ({self.shard})")
        for column in ("stage", "count", "computed this run", "seconds"):
            counts.add_column(column, justify="left" if column == "stage" else "right")
        stage_of = {"teacher responses": "teacher", "clips synthesised": "tts", "clips checked by ASR": "asr",
                    "clips with features": "features"}  # fmt: skip
        for name, value in self.counts.items():
            stage = stage_of.get(name, "")
            generated = str(self.generated.get(stage, "")) if stage else ""
            seconds = f"{self.timings_s[stage]:.1f}" if stage in self.timings_s else ""
            counts.add_row(name, str(value), generated, seconds)
        voices = Table(title="audio per voice")
        for column in (
            "voice",
            "splits",
            "clips",
            "rejected",
            "hours",
            "s/clip",
            "WER mean",
            "median",
            "p90",
        ):
            voices.add_column(column, justify="left" if column in ("voice", "splits") else "right")
        for voice in self.voices:
            voices.add_row(*_voice_cells(voice))
        rejects = Table(title=f"rejects ({sum(self.rejects_by_reason.values())})")
        rejects.add_column("reason")
        rejects.add_column("count", justify="right")
        for reason, count in self.rejects_by_reason.items():
            rejects.add_row(reason, str(count))
        return [counts, voices, rejects]

    def print(self, console: Console) -> None:
        for table in self.tables():
            console.print(table)
        console.print(f"truncated teacher responses: {self.truncated_responses}")
        if self.teacher_cache:
            cache = self.teacher_cache
            console.print(
                f"teacher logit cache: {cache['items']} items, {cache['rows']} rows, {cache['bytes'] / 1e6:.2f} MB, "
                f"{cache['bytes_per_token']} bytes/token (k={cache['k']}, τ={cache['temperature']})"
            )
        if any(self.missing.values()):
            console.print(f"[yellow]not finished yet: {self.missing}[/yellow]")

    def to_markdown(self) -> str:
        lines = [f"# cmkd prepare ({self.shard})", "", "| stage | count | computed this run | seconds |",
                 "|---|---:|---:|---:|"]  # fmt: skip
        stage_of = {"teacher responses": "teacher", "clips synthesised": "tts", "clips checked by ASR": "asr",
                    "clips with features": "features"}  # fmt: skip
        for name, value in self.counts.items():
            stage = stage_of.get(name, "")
            generated = self.generated.get(stage, "") if stage else ""
            seconds = f"{self.timings_s[stage]:.1f}" if stage in self.timings_s else ""
            lines.append(f"| {name} | {value} | {generated} | {seconds} |")
        lines += ["", "| voice | splits | clips | rejected | hours | s/clip | WER mean | median | p90 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += ["| " + " | ".join(_voice_cells(voice)) + " |" for voice in self.voices]
        lines += ["", "| reject reason | count |", "|---|---:|"]
        lines += [f"| {reason} | {count} |" for reason, count in self.rejects_by_reason.items()]
        lines += ["", f"Truncated teacher responses: {self.truncated_responses}."]
        if self.teacher_cache:
            cache = self.teacher_cache
            lines.append(
                f"Teacher logit cache: {cache['items']} items, {cache['rows']} rows, {cache['bytes']} bytes, "
                f"{cache['bytes_per_token']} bytes/token (k = {cache['k']}, τ = {cache['temperature']})."
            )
        timing = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.timings_s.items())
        lines += [f"Stage wall-clock in this run: {timing}.", ""]
        return "\n".join(lines)


def _voice_cells(voice: dict[str, Any]) -> list[str]:
    def number(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return [
        voice["voice"], voice["splits"], str(voice["clips"]), str(voice["rejected"]), number(voice["hours"], 4),
        number(voice["seconds_per_clip"], 2), number(voice["wer_mean"]), number(voice["wer_median"]),
        number(voice["wer_p90"]),
    ]  # fmt: skip


def clip_counts(assembly: Assembly) -> Counter[str]:
    """Clips that got through each stage (a clip rejected by the ASR check was still synthesised)."""
    counts: Counter[str] = Counter()
    for _, state in assembly.clips:
        if state.plan.tts_voice is not None and state.audio_sha256:
            counts["synthesised"] += 1
        if state.checked:
            counts["checked"] += 1
        if state.reject is None and not state.missing:
            counts["kept"] += 1
    return counts
