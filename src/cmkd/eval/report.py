"""`cmkd report RUN_DIRS... --out DIR`: Markdown, JSON, PNG plots and a terminal table from eval runs.

Reads each run's `scores.json` (and, for a before/after comparison, its per-item files), so a report can be
rebuilt at any time without a model. Two rules keep it honest:
- every overall number is printed with the list of subsets it averages (a macro mean means nothing without it);
- a gap whose 95% CI includes zero is labelled "not distinguishable from zero" right next to the number.

With two runs the first is "before" and the second "after" (e.g. an untrained projector and the distilled
student): gap closure is computed item by item over the items both runs answered. Training curves are drawn when
a `metrics.jsonl` training log (columns step, loss, ce, kd, channel, tokens_per_s) sits in or beside a run dir
or its student checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cmkd.data.jsonl_io import ParseError, atomic_write_text, read_jsonl
from cmkd.errors import UserError
from cmkd.eval.metrics import GapScores, ModeScores, gap_closure
from cmkd.eval.modes import ItemsFile
from cmkd.eval.runner import ITEMS_DIR, SCORES_FILE
from cmkd.eval.summary import STUDENT_SPEECH, STUDENT_TEXT, TEACHER_TEXT, item_values

GAP_LABELS = {"forgetting": "F (forgetting)", "modality_gap": "G (modality gap)", "total_gap": "total gap"}
NOT_DISTINGUISHABLE = "not distinguishable from zero"
TRAINING_LOG = "metrics.jsonl"


@dataclass
class RunScores:
    label: str
    path: Path
    scores: dict[str, Any]


@dataclass
class ReportResult:
    markdown: Path
    json: Path
    plots: list[Path]


def load_run(run_dir: Path, label: str | None = None) -> RunScores:
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {SCORES_FILE}; run `cmkd eval` into this directory first")
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    return RunScores(label or Path(run_dir).resolve().name, Path(run_dir), scores)


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Run dir names, made unique (two runs called 'eval' in different parents become 'a/eval', 'b/eval')."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(d).resolve().parent.name}/{name}" for d, name in zip(run_dirs, names, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Numbers as text
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ci_text(estimate: float, ci: Mapping[str, Any] | None) -> str:
    """'−12.5 [−20.1, −4.3]', plus the zero warning when the interval includes zero."""
    if ci is None:
        return f"{estimate:+.1f}"
    text = f"{estimate:+.1f} [{ci['low']:+.1f}, {ci['high']:+.1f}]"
    return f"{text} ({NOT_DISTINGUISHABLE})" if ci["low"] <= 0.0 <= ci["high"] else text


def _gap_cells(gap: Mapping[str, Any]) -> list[str]:
    cis = gap.get("cis") or {}
    return [ci_text(gap[name], cis.get(name)) for name in GAP_LABELS]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# Markdown sections
# ---------------------------------------------------------------------------------------------------------------


def _runs_section(runs: Sequence[RunScores]) -> list[str]:
    rows = []
    for run in runs:
        s, settings = run.scores, run.scores.get("settings", {})
        rows.append(
            [
                run.label,
                str(run.path),
                s["suite"],
                str(s["n_items"]),
                settings.get("teacher", "?"),
                settings.get("student_checkpoint") or "(untrained / none)",
                settings.get("judge") or "none",
            ]
        )
    return [
        "## Runs",
        "",
        *_table(["run", "dir", "suite", "items", "teacher", "student checkpoint", "judge"], rows),
    ]


def _scores_section(run: RunScores, metric: str) -> list[str]:
    summary = run.scores["metrics"].get(metric)
    if not summary or "means" not in summary:
        return [f"No `{metric}` summary for {run.label}."]
    modes = list(summary["overall"])
    rows = [
        [subset, str(summary["n_per_subset"][subset])] + [_fmt(summary["means"][subset][m]) for m in modes]
        for subset in summary["subsets"]
    ]
    rows.append(
        ["**overall (macro)**", str(summary["n_items"])] + [_fmt(summary["overall"][m]) for m in modes]
    )
    lines = [f"### {run.label}: `{metric}` (points, 0-100)", "", *_table(["subset", "n", *modes], rows), ""]
    lines.append(
        f"Overall = unweighted mean over the {len(summary['subsets'])} subsets: "
        f"{', '.join(summary['subsets'])}."
    )
    if summary.get("n_excluded"):
        lines.append(f"{summary['n_excluded']} item(s) left out because some mode has no answer for them.")
    return lines


def _gaps_section(run: RunScores, metric: str) -> list[str]:
    gaps = (run.scores["metrics"].get(metric) or {}).get("gaps") or {}
    lines: list[str] = []
    for student, block in gaps.items():
        rows = [[subset, *_gap_cells(gap)] for subset, gap in block["per_subset"].items()]
        rows.append(["**overall (macro)**", *_gap_cells(block["overall"])])
        lines += [f"### {run.label}: {student} (`{metric}`, points, 95% paired-bootstrap CI)", ""]
        lines += [*_table(["subset", *GAP_LABELS.values()], rows), ""]
    voices = run.scores.get("per_voice", {}).get(metric, {})
    if voices:
        rows = [[voice, str(gap["n_items"]), *_gap_cells(gap)] for voice, gap in voices.items()]
        lines += [f"Per voice (all subsets pooled, student, `{metric}`):", ""]
        lines += [*_table(["voice", "n", *GAP_LABELS.values()], rows), ""]
    return lines


def _mode_cells(name: str, s: Mapping[str, Any]) -> list[str]:
    scores = [_fmt(s["score"]), _fmt(s["strict"]), _fmt(s["parse_fail_rate"]), _fmt(s.get("agree"))]
    forced = [_fmt(s["kl"], 3), _fmt(s["nll"], 3), _fmt(s.get("wer"), 3)]
    return [name, str(s["n"]), *scores, *forced, _fmt(s["seconds_per_item"], 2), _fmt(_cpu_per_item(s), 2)]


def _modes_section(run: RunScores) -> list[str]:
    rows = []
    for mode, stats in run.scores["modes"].items():
        rows.append(_mode_cells(mode, stats))
        rows += [_mode_cells(f"{mode}[{voice}]", s) for voice, s in (stats.get("voices") or {}).items()]
    header = ["mode", "n", "score", "strict", "parse fail %", "agree", "KL(T‖S)", "NLL(ŷ)", "WER", "s/item"]
    return [f"### {run.label}", "", *_table([*header, "CPU s/item"], rows), ""]


def _cpu_per_item(stats: Mapping[str, Any]) -> float | None:
    """CPU seconds per answer (all threads); comparable across runs on a shared machine, unlike wall time."""
    cpu = stats.get("cpu_seconds")
    return cpu / stats["n"] if cpu and stats["n"] else None


def _flips_section(run: RunScores) -> list[str]:
    rows = [
        [
            c["comparison"],
            c["metric"],
            str(c["n"]),
            _fmt(100 * c["flips"]["right_to_wrong"]),
            _fmt(100 * c["flips"]["wrong_to_right"]),
            f"{c['mcnemar']['p_value']:.3g}",
        ]
        for c in run.scores.get("comparisons", [])
    ]
    if not rows:
        return []
    header = ["a -> b", "metric", "n", "right->wrong %", "wrong->right %", "McNemar p"]
    return [f"### {run.label}", "", *_table(header, rows), ""]


def _kl_section(run: RunScores) -> list[str]:
    """`b − a` of KL per token (negative: b is closer to the teacher), paired over the items both answered."""
    rows = []
    for c in run.scores.get("kl_contrasts", []):
        change = f"{c['difference']:+.3f} [{c['ci']['low']:+.3f}, {c['ci']['high']:+.3f}]"
        if c["ci"]["low"] <= 0.0 <= c["ci"]["high"]:
            change += " (not distinguishable from zero)"
        rows.append([c["contrast"], str(c["n"]), _fmt(c["kl_before"], 3), _fmt(c["kl_after"], 3), change])
    if not rows:
        return []
    header = ["a -> b", "n", "KL a", "KL b", "b − a [95% CI]"]
    return [f"### {run.label}", "", *_table(header, rows), ""]


def _closure_rows(closure: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for gap, c in closure.items():
        change = ci_text(c["absolute"], c.get("ci"))
        relative = "–" if c.get("relative") is None else f"{100 * c['relative']:.0f}%"
        rows.append([GAP_LABELS[gap], _fmt(c["before"]), _fmt(c["after"]), change, relative])
    return rows


def closure_between_runs(before: RunScores, after: RunScores, seed: int = 0) -> dict[str, Any] | None:
    """Item-by-item gap closure from run `before` to run `after` over the items both answered (`score`)."""
    modes = (TEACHER_TEXT, STUDENT_TEXT, STUDENT_SPEECH)
    values = {}
    for tag, run in (("before", before), ("after", after)):
        for mode in modes:
            rows = ItemsFile(run.path / ITEMS_DIR / f"{mode}.jsonl").load()
            values[(tag, mode)] = item_values(rows, "score")
    ids = tuple(i for i in values[("before", TEACHER_TEXT)] if all(i in v for v in values.values()))
    if not ids:
        return None

    def gap_scores(tag: str) -> GapScores:
        return GapScores(*(ModeScores(m, ids, tuple(values[(tag, m)][i] for i in ids)) for m in modes))

    n_resamples = int(after.scores.get("settings", {}).get("bootstrap_samples") or 1000)
    closure = gap_closure(gap_scores("before"), gap_scores("after"), n_resamples=n_resamples, seed=seed)
    return {
        "before": before.label,
        "after": after.label,
        "n_items": len(ids),
        "gaps": {name: asdict(c) for name, c in closure.items()},
    }


def _closure_section(runs: Sequence[RunScores], across: dict[str, Any] | None) -> list[str]:
    blocks = [(f"{across['before']} -> {across['after']}", across)] if across else []
    for run in runs:
        blocks += [
            (f"{run.label}: {c['before']} -> {c['after']}", c) for c in run.scores.get("closure", {}).values()
        ]
    lines: list[str] = []
    for title, block in blocks:
        lines += [f"### {title} ({block['n_items']} items, `{block.get('metric', 'score')}`)", ""]
        lines += [
            *_table(
                ["gap", "before", "after", "closed (before − after) [95% CI]", "relative"],
                _closure_rows(block["gaps"]),
            ),
            "",
        ]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Training logs
# ---------------------------------------------------------------------------------------------------------------


def find_training_log(run: RunScores) -> Path | None:
    """A `metrics.jsonl` in or beside the run dir, or in or beside the student checkpoint it evaluated."""
    places = [run.path, run.path.parent]
    checkpoint = run.scores.get("settings", {}).get("student_checkpoint")
    if checkpoint:
        places += [Path(checkpoint), Path(checkpoint).parent, Path(checkpoint).parent.parent]
    return next((place / TRAINING_LOG for place in places if (place / TRAINING_LOG).is_file()), None)


def read_training_log(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path) if not isinstance(row, ParseError) and "step" in row]


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def print_scores_table(run: RunScores, console: Console | None = None) -> None:
    """The headline numbers of one run as a rich table: modes, then the student's gaps overall."""
    console = console or Console()
    table = Table(title=f"{run.label}: {run.scores['suite']} ({run.scores['n_items']} items)")
    header = (
        "mode",
        "n",
        "score",
        "strict",
        "parse fail %",
        "agree",
        "KL",
        "NLL",
        "WER",
        "s/item",
        "CPU s/item",
    )
    for column in header:
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=column == "mode")
    for mode, stats in run.scores["modes"].items():
        table.add_row(*_mode_cells(mode, stats))
    console.print(table)
    summary = run.scores["metrics"].get("score") or {}
    for student, block in (summary.get("gaps") or {}).items():
        cells = _gap_cells(block["overall"])
        console.print(f"[bold]{student}[/bold] overall over {', '.join(summary['subsets'])}:")
        for label, cell in zip(GAP_LABELS.values(), cells, strict=True):
            console.print(f"  {label}: {cell}")
    skipped = run.scores.get("skipped_subsets") or {}
    for subset, why in skipped.items():
        console.print(f"[yellow]skipped {subset}[/yellow]: {why}")


def build_report(
    run_dirs: Sequence[Path], out_dir: Path, *, console: Console | None = None, plots: bool = True
) -> ReportResult:
    """Write report.md, report.json and PNG plots for `run_dirs` into `out_dir`; print the rich tables."""
    from cmkd.eval.report_plots import plot_gaps, plot_scores, plot_training

    if not run_dirs:
        raise UserError("cmkd report: give at least one eval run directory")
    runs = [load_run(Path(d), label) for d, label in zip(run_dirs, _labels(run_dirs), strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    across = closure_between_runs(runs[0], runs[1]) if len(runs) == 2 else None
    logs = {run.label: path for run in runs if (path := find_training_log(run)) is not None}
    images: list[Path] = []
    if plots:
        images += [plot_scores(runs, out_dir / "scores.png"), plot_gaps(runs, out_dir / "gaps.png")]
        if all(
            "agree" in run.scores.get("metrics", {}) for run in runs
        ):  # forgetting of the teacher's answers
            images.append(plot_gaps(runs, out_dir / "gaps_agree.png", metric="agree"))
        for index, (label, path) in enumerate(logs.items()):
            rows = read_training_log(path)
            if rows:
                images.append(plot_training(rows, label, out_dir / f"training_{index}.png"))

    md = ["# cmkd evaluation report", "", *_runs_section(runs), ""]
    md += [
        "F = teacher text − student text (forgetting); G = student text − student speech (modality gap); "
        "total = teacher text − student speech = F + G. Scores in points (0-100).",
        "",
    ]
    for metric in ("score", "strict", "agree"):
        md += [f"## Scores per subset (`{metric}`)", ""]
        for run in runs:
            md += [*_scores_section(run, metric), ""]
    md += ["## Forgetting and modality gap", ""]
    for run in runs:
        for metric in ("score", "strict", "agree"):
            md += _gaps_section(run, metric)
    md += ["## Modes: scores, teacher-forced metrics, ASR, time", ""]
    for run in runs:
        md += _modes_section(run)
    md += ["## Item-level flips (McNemar)", ""]
    for run in runs:
        md += _flips_section(run)
    kl_lines = [line for run in runs for line in _kl_section(run)]
    if kl_lines:
        md += ["## Teacher-forced KL to the teacher: paired contrasts", "", *kl_lines]
    closure_lines = _closure_section(runs, across)
    if closure_lines:
        md += ["## Before / after: gap closure", "", *closure_lines]
    md += ["## Skipped", ""]
    for run in runs:
        s = run.scores
        md.append(
            f"- {run.label}: {s['skipped_items']['total']} item answer(s) skipped {s['skipped_items']['by_reason']}"
        )
        md += [f"  - subset {subset}: {why}" for subset, why in s.get("skipped_subsets", {}).items()]
    md += ["", "## Training curves", ""]
    md += [f"- {label}: `{path}`" for label, path in logs.items()] or [
        "No training log (metrics.jsonl) found."
    ]
    md += ["", "## Plots", ""] + [f"![{image.stem}]({image.name})" for image in images]
    markdown = out_dir / "report.md"
    atomic_write_text(markdown, "\n".join(md) + "\n")
    payload = {
        "runs": [{"label": r.label, "path": str(r.path), "scores": r.scores} for r in runs],
        "closure": across,
        "training_logs": {k: str(v) for k, v in logs.items()},
        "plots": [image.name for image in images],
    }
    json_path = out_dir / "report.json"
    atomic_write_text(json_path, json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    console = console or Console()
    for run in runs:
        print_scores_table(run, console)
    console.print(f"report: {markdown}")
    return ReportResult(markdown, json_path, images)
