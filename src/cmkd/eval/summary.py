"""From per-item rows to `scores.json`: means, forgetting / modality gap / total gap with CIs, flips, closure.

Everything here is paired (see `cmkd.eval.metrics`): a summary uses only the items every mode answered, and says
how many it had to leave out (a clip that could not be read drops its item from all columns, otherwise the
text and speech columns would average over different questions). A mode with several voices scores an item by
the mean over its voices; each voice also gets its own gaps and item-level tests.

Three metrics are summarised: `score` (lenient, VoiceBench's convention), `strict` (unparsed answers wrong) and
`agree` (normalised exact agreement with the teacher's text answer, the demo's headline: it measures whether the
student says what the teacher says, whatever the gold).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cmkd.data.jsonl_io import Reject
from cmkd.eval.kl_contrasts import kl_contrasts
from cmkd.eval.metrics import (
    GapScores,
    ModeScores,
    flip_rates,
    gap_closure,
    gap_metrics,
    mcnemar,
    subset_and_overall,
)
from cmkd.eval.modes import STUDENT, TEACHER, ModeSpec
from cmkd.eval.suites import Suite

Rows = Mapping[tuple[str, str], Mapping[str, Any]]
METRICS = ("score", "strict", "agree")
TEACHER_TEXT, STUDENT_TEXT, STUDENT_SPEECH = f"{TEACHER}.text", f"{STUDENT}.text", f"{STUDENT}.speech"
CASCADE, MISMATCHED = "cascade.asr", f"{STUDENT}.mismatched"


def _value(row: Mapping[str, Any], metric: str) -> float | None:
    value = row.get(metric) if metric in ("score", "strict") else (row.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


def item_values(rows: Rows, metric: str, voice: str | None = None) -> dict[str, float]:
    """{item id: value}: one voice's rows, or the mean over an item's voices when `voice` is None."""
    grouped: dict[str, list[float]] = {}
    for (item_id, row_voice), row in rows.items():
        value = _value(row, metric)
        if value is not None and (voice is None or row_voice == voice):
            grouped.setdefault(item_id, []).append(value)
    return {item_id: statistics.fmean(values) for item_id, values in grouped.items()}


def voices_of(rows: Rows) -> list[str]:
    return sorted({voice for _, voice in rows})


def _as_dict(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def _points(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def mode_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over one mode's rows (scores in points), teacher-forced metrics, WER, time."""
    seconds = sum(float(row.get("seconds") or 0.0) for row in rows)
    cpu_seconds = sum(float(row.get("cpu_seconds") or 0.0) for row in rows)
    stats: dict[str, Any] = {
        "n": len(rows),
        "score": _points(_mean([_value(row, "score") for row in rows])),
        "strict": _points(_mean([_value(row, "strict") for row in rows])),
        "parse_fail_rate": _points(_mean([0.0 if row.get("parsed") else 1.0 for row in rows])),
        "kl": _mean([row.get("kl") for row in rows]),
        "nll": _mean([row.get("nll") for row in rows]),
        "seconds": seconds,
        "seconds_per_item": seconds / len(rows) if rows else None,
        "cpu_seconds": cpu_seconds,
    }
    for name in ("agree", "first3", "slot_recall"):
        stats[name] = _points(_mean([_value(row, name) for row in rows]))
    if any("wer" in row for row in rows):
        stats["wer"] = _mean([row.get("wer") for row in rows])
    return stats


def _subset_summary(
    suite: Suite,
    values: Mapping[str, Mapping[str, float]],
    gap_triples: Mapping[str, tuple[str, str, str]],
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Per-subset means and macro overall over the items every mode scored; gaps for each student triple."""
    modes = list(values)
    aligned = [item for item in suite.items if all(item.id in values[mode] for mode in modes)]
    by_subset: dict[str, dict[str, ModeScores]] = {}
    for subset in suite.subsets:
        ids = tuple(item.id for item in aligned if item.subset == subset)
        if ids:
            by_subset[subset] = {
                mode: ModeScores(mode, ids, tuple(values[mode][item_id] for item_id in ids)) for mode in modes
            }
    result: dict[str, Any] = {
        "n_items": len(aligned),
        "n_excluded": len(suite.items) - len(aligned),
        "subsets_without_items": [subset for subset in suite.subsets if subset not in by_subset],
    }
    if not by_subset:
        return result
    summary = subset_and_overall(by_subset, n_resamples=0)
    result.update(subsets=list(summary.subsets), n_per_subset=summary.n_items, means=summary.means)
    result["overall"] = summary.overall
    result["gaps"] = {}
    for student, triple in gap_triples.items():
        gaps = subset_and_overall(by_subset, gap_modes=triple, n_resamples=n_resamples, seed=seed)
        assert gaps.gaps is not None
        result["gaps"][student] = {
            "modes": list(triple),
            "overall": _as_dict(gaps.overall_gaps),
            "per_subset": {subset: _as_dict(gap) for subset, gap in gaps.gaps.items()},
        }
    return result


def _pair(
    name: str, values_a: Mapping[str, float], values_b: Mapping[str, float], metric: str
) -> dict[str, Any] | None:
    """McNemar and flips from a to b over the items both scored right/wrong (judge ratings are left out)."""
    ids = [item_id for item_id in values_a if item_id in values_b]
    binary = [i for i in ids if values_a[i] in (0.0, 1.0) and values_b[i] in (0.0, 1.0)]
    if not binary:
        return None
    a = [values_a[i] for i in binary]
    b = [values_b[i] for i in binary]
    return {
        "comparison": name,
        "metric": metric,
        "n": len(binary),
        "mcnemar": _as_dict(mcnemar(a, b)),
        "flips": _as_dict(flip_rates(a, b)),
    }


def _comparisons(
    rows_by_mode: Mapping[str, Rows], extras: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    def values(mode: str, voice: str | None = None) -> dict[str, float]:
        return item_values(rows_by_mode.get(mode, {}), metric, voice)

    pairs: list[tuple[str, dict[str, float], dict[str, float]]] = [
        (f"{TEACHER_TEXT} -> {STUDENT_TEXT}", values(TEACHER_TEXT), values(STUDENT_TEXT))
    ]
    for voice in voices_of(rows_by_mode.get(STUDENT_SPEECH, {})):
        speech = values(STUDENT_SPEECH, voice)
        pairs.append((f"{STUDENT_TEXT} -> {STUDENT_SPEECH}[{voice}]", values(STUDENT_TEXT), speech))
        if CASCADE in rows_by_mode:
            cascade = values(CASCADE, voice)
            pairs.append((f"{TEACHER_TEXT} -> {CASCADE}[{voice}]", values(TEACHER_TEXT), cascade))
            pairs.append((f"{STUDENT_SPEECH}[{voice}] -> {CASCADE}[{voice}]", speech, cascade))
        if MISMATCHED in rows_by_mode:
            pairs.append((f"{STUDENT_SPEECH}[{voice}] -> {MISMATCHED}", speech, values(MISMATCHED)))
        for name in extras:
            pairs.append(
                (
                    f"{name}.speech[{voice}] -> {STUDENT_SPEECH}[{voice}]",
                    values(f"{name}.speech", voice),
                    speech,
                )
            )
    for name in extras:
        pairs.append((f"{name}.text -> {STUDENT_TEXT}", values(f"{name}.text"), values(STUDENT_TEXT)))
    return [result for name, a, b in pairs if (result := _pair(name, a, b, metric)) is not None]


def _per_voice_gaps(
    rows_by_mode: Mapping[str, Rows], metric: str, n_resamples: int, seed: int
) -> dict[str, Any]:
    """F, G and total gap per voice, over the items that have that voice (pooled over subsets)."""
    teacher, text = (
        item_values(rows_by_mode[TEACHER_TEXT], metric),
        item_values(rows_by_mode[STUDENT_TEXT], metric),
    )
    result = {}
    for voice in voices_of(rows_by_mode[STUDENT_SPEECH]):
        speech = item_values(rows_by_mode[STUDENT_SPEECH], metric, voice)
        ids = tuple(i for i in speech if i in teacher and i in text)
        if not ids:
            continue
        triple = [
            ModeScores(mode, ids, tuple(v[i] for i in ids))
            for mode, v in (
                (TEACHER_TEXT, teacher),
                (STUDENT_TEXT, text),
                (f"{STUDENT_SPEECH}[{voice}]", speech),
            )
        ]
        result[voice] = _as_dict(gap_metrics(*triple, n_resamples=n_resamples, seed=seed))
    return result


def _closure(
    suite: Suite, rows_by_mode: Mapping[str, Rows], extras: Sequence[str], n_resamples: int, seed: int
) -> dict[str, Any]:
    """How much the main student closed each gap relative to each extra student (before = extra, after = main).

    Keyed by the extra's name for the primary metric (`score`) and `<name>/agree` for agreement with the teacher's
    answer: on a suite close to the training data, gold accuracy can rise while the student drifts away from the
    teacher, and agreement is the metric that sees that drift (forgetting of the teacher's behaviour)."""
    result: dict[str, Any] = {}
    for name in extras:
        modes = (TEACHER_TEXT, f"{name}.text", f"{name}.speech", STUDENT_TEXT, STUDENT_SPEECH)
        if not all(rows_by_mode.get(mode) for mode in modes):
            continue
        for metric in ("score", "agree"):
            values = {mode: item_values(rows_by_mode[mode], metric) for mode in modes}
            ids = tuple(item.id for item in suite.items if all(item.id in values[mode] for mode in modes))
            if not ids:
                continue
            scores = {mode: ModeScores(mode, ids, tuple(values[mode][i] for i in ids)) for mode in modes}
            before = GapScores(scores[TEACHER_TEXT], scores[f"{name}.text"], scores[f"{name}.speech"])
            after = GapScores(scores[TEACHER_TEXT], scores[STUDENT_TEXT], scores[STUDENT_SPEECH])
            closure = gap_closure(before, after, n_resamples=n_resamples, seed=seed)
            result[name if metric == "score" else f"{name}/{metric}"] = {
                "before": name,
                "after": STUDENT,
                "metric": metric,
                "n_items": len(ids),
                "gaps": {gap: _as_dict(c) for gap, c in closure.items()},
            }
    return result


def summarise(
    suite: Suite,
    modes: Sequence[ModeSpec],
    rows_by_mode: Mapping[str, Rows],
    skipped: Sequence[Reject],
    *,
    n_resamples: int,
    seed: int,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole `scores.json` from the rows on disk (see the module doc)."""
    present = {mode.name: rows_by_mode[mode.name] for mode in modes if rows_by_mode.get(mode.name)}
    extras = [mode.model for mode in modes if mode.name.endswith(".speech") and mode.model != STUDENT]
    triples = {STUDENT: (TEACHER_TEXT, STUDENT_TEXT, STUDENT_SPEECH)}
    triples.update({name: (TEACHER_TEXT, f"{name}.text", f"{name}.speech") for name in extras})
    triples = {name: triple for name, triple in triples.items() if all(mode in present for mode in triple)}
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        values = {mode: item_values(rows, metric) for mode, rows in present.items()}
        if all(values.values()):
            metrics[metric] = _subset_summary(suite, values, triples, n_resamples, seed)
    has_speech = STUDENT_SPEECH in present and TEACHER_TEXT in present and STUDENT_TEXT in present
    modes_out: dict[str, Any] = {}
    for mode in modes:
        rows = present.get(mode.name, {})
        stats = mode_stats(list(rows.values()))
        if mode.per_voice:
            stats["voices"] = {
                voice: mode_stats([r for (_, v), r in rows.items() if v == voice])
                for voice in voices_of(rows)
            }
        modes_out[mode.name] = stats
    reasons = Counter(reject.reason for reject in skipped)
    return {
        "suite": suite.name,
        "n_items": len(suite.items),
        "subsets": suite.subsets,
        "skipped_subsets": dict(suite.skipped_subsets),
        "skipped_items": {"total": len(skipped), "by_reason": dict(reasons)},
        "primary_metric": "score",
        "modes": modes_out,
        "metrics": metrics,
        "per_voice": {
            metric: _per_voice_gaps(present, metric, n_resamples, seed) for metric in ("score", "strict")
        }
        if has_speech
        else {},
        "comparisons": [c for metric in ("score", "strict") for c in _comparisons(present, extras, metric)],
        "closure": _closure(suite, present, extras, n_resamples, seed),
        "kl_contrasts": kl_contrasts(present, extras, n_resamples=n_resamples, seed=seed),
        "settings": dict(settings),
    }
