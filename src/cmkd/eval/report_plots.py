"""PNG plots for `cmkd report`: scores per subset and mode, gaps with CI error bars, training curves.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot): no global backend or figure state, so
reports can be made from a server process or a test without a display and without leaking figures.
Widths grow with the number of subsets and labels are rotated, so eight VoiceBench columns stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from cmkd.eval.report import RunScores

GAPS = (
    ("forgetting", "F: forgetting (teacher text − student text)"),
    ("modality_gap", "G: modality gap (student text − student speech)"),
    ("total_gap", "total gap (teacher text − student speech)"),
)
OVERALL = "overall\n(macro)"


def _width(n_groups: int, n_series: int) -> float:
    """Inches: about 0.2 in per bar plus a gap per group, within what a Markdown viewer shows well."""
    return float(min(20.0, max(8.0, 2.5 + n_groups * (0.2 * n_series + 0.35))))


def _group_axis(ax: Axes, labels: Sequence[str]) -> None:
    ax.set_xticks(
        np.arange(len(labels)),
        labels,
        rotation=30 if len(labels) > 4 else 0,
        ha="right" if len(labels) > 4 else "center",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _bars(
    ax: Axes,
    series: Mapping[str, Sequence[float]],
    errors: Mapping[str, Any] | None = None,
    labels: bool = False,
) -> None:
    """Grouped bars: one bar per series within each group, optional asymmetric error bars.

    `labels` prints each value on its bar, so a score of 0 reads as 0 and not as a missing bar."""
    n_series = max(1, len(series))
    width = 0.8 / n_series
    for index, (name, values) in enumerate(series.items()):
        x = np.arange(len(values)) + (index - (n_series - 1) / 2) * width
        yerr = None if errors is None else errors.get(name)
        bars = ax.bar(x, values, width, label=name, yerr=yerr, capsize=3 if yerr is not None else 0)
        if labels:
            ax.bar_label(bars, fmt="%.0f", fontsize=6.5, padding=1)


def plot_scores(runs: Sequence[RunScores], path: Path, metric: str = "score") -> Path:
    """Per run: mean score per subset (and the macro overall) for every mode, text and speech side by side."""
    usable = [run for run in runs if "means" in (run.scores["metrics"].get(metric) or {})]
    n_groups = max((len(run.scores["metrics"][metric]["subsets"]) + 1 for run in usable), default=1)
    n_modes = max((len(run.scores["metrics"][metric]["overall"]) for run in usable), default=1)
    figure = Figure(figsize=(_width(n_groups, n_modes), 4.2 * max(1, len(usable))), layout="constrained")
    axes = figure.subplots(max(1, len(usable)), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, usable, strict=False):
        summary = run.scores["metrics"][metric]
        subsets = list(summary["subsets"])
        series = {
            mode: [summary["means"][s][mode] for s in subsets] + [summary["overall"][mode]]
            for mode in summary["overall"]
        }
        _bars(ax, series, labels=len(series) * len(subsets) <= 80)
        _group_axis(ax, [*subsets, OVERALL])
        ax.set_ylim(0, 110)
        ax.set_ylabel(f"{metric} (points)")
        ax.set_title(f"{run.label}: text vs speech by subset ({summary['n_items']} items)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if not usable:
        axes[0].text(0.5, 0.5, "no scores to plot", ha="center", va="center")
    figure.savefig(path, dpi=120)
    return path


def _gap_series(runs: Sequence[RunScores], metric: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Subsets (union, in order) and, per (run, student), each subset's gap dict ('overall' included)."""
    subsets: list[str] = []
    blocks: dict[str, dict[str, Any]] = {}
    for run in runs:
        gaps = (run.scores["metrics"].get(metric) or {}).get("gaps") or {}
        for student, block in gaps.items():
            name = run.label if student == "student" and len(gaps) == 1 else f"{run.label}: {student}"
            blocks[name] = {**block["per_subset"], OVERALL: block["overall"]}
            subsets += [s for s in block["per_subset"] if s not in subsets]
    return [*subsets, OVERALL], blocks


def plot_gaps(runs: Sequence[RunScores], path: Path, metric: str = "score") -> Path:
    """F, G and total gap per subset and overall, one bar per run/student, with 95% CI error bars."""
    groups, blocks = _gap_series(runs, metric)
    figure = Figure(figsize=(_width(len(groups), len(blocks)), 9.0), layout="constrained")
    axes = figure.subplots(len(GAPS), 1, squeeze=False)[:, 0]
    for ax, (gap, title) in zip(axes, GAPS, strict=True):
        series: dict[str, list[float]] = {}
        errors: dict[str, Any] = {}
        for name, by_group in blocks.items():
            values, low, high = [], [], []
            for group in groups:
                entry = by_group.get(group)
                value = float("nan") if entry is None else entry[gap]
                ci = None if entry is None else (entry.get("cis") or {}).get(gap)
                values.append(value)
                low.append(0.0 if ci is None else max(0.0, value - ci["low"]))
                high.append(0.0 if ci is None else max(0.0, ci["high"] - value))
            series[name], errors[name] = values, np.array([low, high])
        _bars(ax, series, errors)
        ax.axhline(0.0, color="black", linewidth=0.8)
        _group_axis(ax, groups)
        ax.set_ylabel("points")
        ax.set_title(f"{title}, {metric}; bars: 95% CI")
        if blocks:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    figure.savefig(path, dpi=120)
    return path


def plot_training(rows: Sequence[Mapping[str, Any]], label: str, path: Path) -> Path:
    """Loss terms per channel and throughput against the optimizer step."""
    figure = Figure(figsize=(12.0, 4.0), layout="constrained")
    loss_ax, speed_ax = figure.subplots(1, 2)
    channels = sorted({str(row.get("channel") or "all") for row in rows})
    styles = ("-", "--", ":", "-.")
    for channel_index, channel in enumerate(channels):
        chosen = [row for row in rows if str(row.get("channel") or "all") == channel]
        for column, color in (("loss", "tab:blue"), ("ce", "tab:orange"), ("kd", "tab:green")):
            points = [(row["step"], row[column]) for row in chosen if row.get(column) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                suffix = "" if len(channels) == 1 else f" ({channel})"
                style = styles[channel_index % len(styles)]
                loss_ax.plot(steps, values, style, color=color, label=f"{column}{suffix}")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss per response token")
    loss_ax.set_title(f"{label}: training loss")
    loss_ax.grid(alpha=0.3)
    if loss_ax.lines:
        loss_ax.legend(fontsize="small", frameon=False)
    speed = [(row["step"], row["tokens_per_s"]) for row in rows if row.get("tokens_per_s") is not None]
    if speed:
        steps, values = zip(*speed, strict=True)
        speed_ax.plot(steps, values, "-", color="tab:green")
    speed_ax.set_xlabel("optimizer step")
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_title(f"{label}: throughput")
    speed_ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return path
