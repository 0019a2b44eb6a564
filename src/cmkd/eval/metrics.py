"""Gap metrics and paired statistics over per-item scores: forgetting, modality gap, CIs, McNemar, flips.

Every mode (teacher text, student text, student speech per voice, ASR cascade) answers the SAME items, so all
comparisons here are paired: they line items up by id and resample or count item by item. Pairing is what makes
a 2-point gap on 455 items detectable; treating the modes as independent samples would throw that away. Hence the
strict alignment checks: two score vectors whose ids differ (order included) are refused with the first differing
id, because a silent misalignment gives a plausible-looking but meaningless number.

Scores are per-item in [0, 1] (0/1 for correct/wrong, rating/5 for judged items); reported means, gaps and CIs are
in points (0-100).

    F (forgetting)     = S(teacher, text)  - S(student, text)
    G (modality gap)   = S(student, text)  - S(student, speech)
    total gap          = S(teacher, text)  - S(student, speech)  = F + G
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from cmkd.errors import UserError

POINTS = 100.0
_BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000  # index matrix cells per chunk: ~32 MB of int64 at most


@dataclasses.dataclass(frozen=True)
class ModeScores:
    """One mode's per-item scores, in item order: `mode` names it (e.g. "student_speech/af_heart")."""

    mode: str
    item_ids: tuple[str, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.item_ids:
            raise UserError(f"{self.mode}: no items to score")
        if len(self.item_ids) != len(self.scores):
            raise UserError(f"{self.mode}: {len(self.item_ids)} item ids but {len(self.scores)} scores")
        seen: set[str] = set()
        for item_id in self.item_ids:
            if item_id in seen:
                raise UserError(f"{self.mode}: item id {item_id!r} appears more than once")
            seen.add(item_id)
        for item_id, score in zip(self.item_ids, self.scores, strict=True):
            if not (math.isfinite(score) and 0.0 <= score <= 1.0):
                raise UserError(f"{self.mode}: item {item_id!r} has score {score}; scores must be in [0, 1]")

    @classmethod
    def from_mapping(cls, mode: str, scores_by_id: Mapping[str, float]) -> ModeScores:
        """Build from {item id: score}, keeping the mapping's order."""
        return cls(mode, tuple(scores_by_id), tuple(float(score) for score in scores_by_id.values()))

    def values(self) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64)

    def mean_points(self) -> float:
        return float(self.values().mean() * POINTS)


def check_aligned(*modes: ModeScores) -> None:
    """Refuse score vectors that do not cover the same items in the same order, naming the first mismatch."""
    if not modes:
        raise UserError("no score vectors given")
    first = modes[0]
    for other in modes[1:]:
        for position, (id_a, id_b) in enumerate(zip(first.item_ids, other.item_ids, strict=False)):
            if id_a != id_b:
                raise UserError(
                    f"{other.mode}: item {position} is {id_b!r} but {first.mode} has {id_a!r}; "
                    "modes must score the same items in the same order"
                )
        if len(first.item_ids) != len(other.item_ids):
            longer = first if len(first.item_ids) > len(other.item_ids) else other
            extra = longer.item_ids[min(len(first.item_ids), len(other.item_ids))]
            raise UserError(
                f"{longer.mode}: item {extra!r} has no counterpart "
                f"({first.mode} has {len(first.item_ids)} items, {other.mode} has {len(other.item_ids)})"
            )


def _as_values(scores: ModeScores | Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    values = scores.values() if isinstance(scores, ModeScores) else np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise UserError(f"{name}: need a non-empty 1-D list of per-item scores")
    if not np.all(np.isfinite(values)):
        raise UserError(f"{name}: contains a non-finite score")
    return values


def _paired_values(
    a: ModeScores | Sequence[float] | np.ndarray, b: ModeScores | Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(a, ModeScores) and isinstance(b, ModeScores):
        check_aligned(a, b)
    values_a, values_b = _as_values(a, "a"), _as_values(b, "b")
    if values_a.size != values_b.size:
        raise UserError(
            f"paired scores: {values_a.size} items vs {values_b.size}; they must be the same items"
        )
    return values_a, values_b


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap interval, in points."""

    estimate: float
    low: float
    high: float
    alpha: float
    n_resamples: int


def _check_bootstrap_settings(n_resamples: int, alpha: float) -> None:
    if n_resamples < 1:
        raise UserError(f"n_resamples: must be at least 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha: must be in (0, 1), got {alpha}")


def resampled_means(per_item: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` bootstrap resamples of the items, shape (n_resamples,).

    Indices are drawn in chunks from one generator, so the result depends only on the seed, not on memory, and
    two statistics bootstrapped with the same seed over the same number of items use the same item sets.
    """
    if per_item.ndim != 1 or per_item.size == 0:
        raise UserError("bootstrap: need a non-empty 1-D list of per-item values")
    rng = np.random.default_rng(seed)
    n_items = per_item.size
    rows_per_chunk = max(1, _BOOTSTRAP_CELLS_PER_CHUNK // n_items)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(n_resamples, start + rows_per_chunk)
        indices = rng.integers(0, n_items, size=(stop - start, n_items))  # R_chunk, N
        means[start:stop] = per_item[indices].mean(axis=1)
    return means


def percentile_ci(estimate: float, means: np.ndarray, alpha: float) -> BootstrapCI:
    """Percentile interval of bootstrap means (fractions) around a point estimate (fraction), in points."""
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate * POINTS, float(low * POINTS), float(high * POINTS), alpha, int(means.size))


def bootstrap_mean_ci(per_item: np.ndarray, *, n_resamples: int, seed: int, alpha: float) -> BootstrapCI:
    """Percentile CI of the mean of per-item values (any paired statistic that is a mean of per-item terms)."""
    _check_bootstrap_settings(n_resamples, alpha)
    means = resampled_means(per_item, n_resamples, seed)
    return percentile_ci(float(per_item.mean()), means, alpha)


def paired_bootstrap_ci(
    per_item_a: ModeScores | Sequence[float] | np.ndarray,
    per_item_b: ModeScores | Sequence[float] | np.ndarray | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapCI:
    """CI of mean(a) - mean(b), resampling items with the same indices for both; of mean(a) if b is None."""
    if per_item_b is None:
        return bootstrap_mean_ci(_as_values(per_item_a, "a"), n_resamples=n_resamples, seed=seed, alpha=alpha)
    values_a, values_b = _paired_values(per_item_a, per_item_b)
    return bootstrap_mean_ci(values_a - values_b, n_resamples=n_resamples, seed=seed, alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------
# Item-level agreement between two modes: McNemar and flips
# ---------------------------------------------------------------------------------------------------------------


def _binary(values: np.ndarray, name: str) -> np.ndarray:
    if not np.all((values == 0.0) | (values == 1.0)):
        raise UserError(f"{name}: McNemar and flip rates need 0/1 (wrong/right) scores")
    return values.astype(bool)


@dataclasses.dataclass(frozen=True)
class McNemarResult:
    """b01: items a got wrong and b right; b10: a right, b wrong. `method` is "exact" or "chi2_cc"."""

    b01: int
    b10: int
    statistic: float
    p_value: float
    method: str


EXACT_BELOW_DISCORDANT = 25


def mcnemar(
    a_correct: ModeScores | Sequence[float] | np.ndarray, b_correct: ModeScores | Sequence[float] | np.ndarray
) -> McNemarResult:
    """Two-sided McNemar test on paired right/wrong outcomes.

    With fewer than 25 discordant pairs the exact binomial test (statistic = min(b01, b10), p = twice the lower
    tail of Binomial(b01 + b10, 1/2), capped at 1); otherwise the chi-square test with continuity correction,
    (|b01 - b10| - 1)^2 / (b01 + b10), whose df=1 survival function is erfc(sqrt(x / 2)). Both are exact closed
    forms in the standard library, so no scipy is needed and results do not depend on what is installed.
    """
    values_a, values_b = _paired_values(a_correct, b_correct)
    right_a, right_b = _binary(values_a, "a"), _binary(values_b, "b")
    b01 = int(np.sum(~right_a & right_b))
    b10 = int(np.sum(right_a & ~right_b))
    discordant = b01 + b10
    if discordant < EXACT_BELOW_DISCORDANT:
        smaller = min(b01, b10)
        tail = sum(math.comb(discordant, k) for k in range(smaller + 1)) / 2**discordant
        return McNemarResult(b01, b10, float(smaller), min(1.0, 2.0 * tail), "exact")
    statistic = (abs(b01 - b10) - 1) ** 2 / discordant
    return McNemarResult(b01, b10, statistic, math.erfc(math.sqrt(statistic / 2.0)), "chi2_cc")


@dataclasses.dataclass(frozen=True)
class FlipRates:
    """Fractions of all items that go right->wrong and wrong->right from mode a to mode b."""

    right_to_wrong: float
    wrong_to_right: float
    n_items: int


def flip_rates(
    a_correct: ModeScores | Sequence[float] | np.ndarray, b_correct: ModeScores | Sequence[float] | np.ndarray
) -> FlipRates:
    """Right->wrong and wrong->right fractions from mode a to mode b: a net gap of 0 can hide many flips."""
    values_a, values_b = _paired_values(a_correct, b_correct)
    right_a, right_b = _binary(values_a, "a"), _binary(values_b, "b")
    n_items = int(right_a.size)
    return FlipRates(
        right_to_wrong=float(np.sum(right_a & ~right_b)) / n_items,
        wrong_to_right=float(np.sum(~right_a & right_b)) / n_items,
        n_items=n_items,
    )


# ---------------------------------------------------------------------------------------------------------------
# Forgetting, modality gap, total gap; closure between two students; per-subset and macro overall
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GapScores:
    """The three score vectors a gap needs, over the same items: teacher on text, student on text and speech."""

    teacher_text: ModeScores
    student_text: ModeScores
    student_speech: ModeScores

    def __post_init__(self) -> None:
        check_aligned(self.teacher_text, self.student_text, self.student_speech)

    def per_item_gaps(self) -> dict[str, np.ndarray]:
        """Per-item F, G and total terms; their means are the gaps (as fractions)."""
        teacher, text, speech = (
            self.teacher_text.values(),
            self.student_text.values(),
            self.student_speech.values(),
        )
        return {"forgetting": teacher - text, "modality_gap": text - speech, "total_gap": teacher - speech}


GAP_NAMES = ("forgetting", "modality_gap", "total_gap")


@dataclasses.dataclass(frozen=True)
class GapMetrics:
    """Mode means and gaps in points. `total_gap` is defined as forgetting + modality_gap, so the identity holds
    exactly in every report (it equals teacher_text - student_speech up to float rounding). CIs are paired
    bootstrap intervals over items (None when not requested)."""

    teacher_text: float
    student_text: float
    student_speech: float
    forgetting: float
    modality_gap: float
    total_gap: float
    n_items: int
    cis: dict[str, BootstrapCI] | None = None


def _gaps_from_means(
    teacher: float, text: float, speech: float, n_items: int, cis: dict[str, BootstrapCI] | None
) -> GapMetrics:
    forgetting, modality_gap = teacher - text, text - speech
    return GapMetrics(
        teacher, text, speech, forgetting, modality_gap, forgetting + modality_gap, n_items, cis
    )


def gap_metrics(
    teacher_text: ModeScores,
    student_text: ModeScores,
    student_speech: ModeScores,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> GapMetrics:
    """F = teacher_text - student_text, G = student_text - student_speech, total = F + G, in points.

    With `n_resamples` > 0, each gap gets a paired bootstrap CI; one seed means the three CIs resample the same
    item sets, so they are mutually consistent.
    """
    scores = GapScores(teacher_text, student_text, student_speech)
    cis = None
    if n_resamples > 0:
        _check_bootstrap_settings(n_resamples, alpha)
        cis = {
            name: bootstrap_mean_ci(terms, n_resamples=n_resamples, seed=seed, alpha=alpha)
            for name, terms in scores.per_item_gaps().items()
        }
    means = (teacher_text.mean_points(), student_text.mean_points(), student_speech.mean_points())
    return _gaps_from_means(*means, len(teacher_text.item_ids), cis)


@dataclasses.dataclass(frozen=True)
class Closure:
    """How much one gap shrank from `before` to `after` (points): absolute = before - after (positive = closed),
    relative = absolute / before (None when before is 0), with a paired bootstrap CI of the absolute change."""

    before: float
    after: float
    absolute: float
    relative: float | None
    ci: BootstrapCI | None


def gap_closure(
    before: GapScores, after: GapScores, *, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Closure]:
    """Closure of forgetting, modality gap and total gap between two students (e.g. baseline and distilled).

    The CI is on the difference of differences, item by item: (gap_before_i - gap_after_i), resampled over items,
    which is only meaningful because all six score vectors cover the same items (checked).
    """
    check_aligned(before.teacher_text, after.teacher_text)
    before_terms, after_terms = before.per_item_gaps(), after.per_item_gaps()
    result: dict[str, Closure] = {}
    for name in GAP_NAMES:
        change = before_terms[name] - after_terms[name]
        gap_before = float(before_terms[name].mean() * POINTS)
        gap_after = float(after_terms[name].mean() * POINTS)
        absolute = gap_before - gap_after
        ci = (
            bootstrap_mean_ci(change, n_resamples=n_resamples, seed=seed, alpha=alpha)
            if n_resamples > 0
            else None
        )
        relative = absolute / gap_before if gap_before != 0.0 else None
        result[name] = Closure(gap_before, gap_after, absolute, relative, ci)
    return result


@dataclasses.dataclass(frozen=True)
class SubsetSummary:
    """Per-subset mode means (points) and the macro overall (unweighted mean over `subsets`, which is always
    listed, because an "overall" is meaningless without its column set). Gaps are filled when gap modes are given."""

    subsets: tuple[str, ...]
    n_items: dict[str, int]
    means: dict[str, dict[str, float]]
    overall: dict[str, float]
    gaps: dict[str, GapMetrics] | None = None
    overall_gaps: GapMetrics | None = None


def subset_and_overall(
    scores_by_subset: Mapping[str, Mapping[str, ModeScores]],
    *,
    gap_modes: tuple[str, str, str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> SubsetSummary:
    """Means per subset and mode, and the macro overall per mode; optionally F/G/total per subset and overall.

    Every subset must have the same modes: a macro mean over different subsets per mode would compare columns
    made of different things. `gap_modes` names (teacher text, student text, student speech) modes; the overall
    gap CI resamples items within each subset and averages the subset means (a stratified bootstrap).
    """
    if not scores_by_subset:
        raise UserError("subsets: none given; nothing to summarise")
    subsets = tuple(scores_by_subset)
    mode_names = tuple(scores_by_subset[subsets[0]])
    if not mode_names:
        raise UserError(f"subset {subsets[0]!r}: no modes")
    for subset in subsets:
        for mode in (*mode_names, *scores_by_subset[subset]):
            if mode not in scores_by_subset[subset] or mode not in mode_names:
                missing_from = subset if mode not in scores_by_subset[subset] else subsets[0]
                raise UserError(
                    f"subset {missing_from!r}: mode {mode!r} missing; every subset needs the same modes"
                )
        check_aligned(*scores_by_subset[subset].values())
    means = {
        subset: {mode: s.mean_points() for mode, s in scores_by_subset[subset].items()} for subset in subsets
    }
    overall = {mode: sum(means[subset][mode] for subset in subsets) / len(subsets) for mode in mode_names}
    n_items = {subset: len(next(iter(scores_by_subset[subset].values())).item_ids) for subset in subsets}
    if gap_modes is None:
        return SubsetSummary(subsets, n_items, means, overall)
    for mode in gap_modes:
        if mode not in mode_names:
            raise UserError(f"gap mode {mode!r}: not among the modes scored ({', '.join(mode_names)})")
    gaps = {}
    per_subset_terms = []
    for subset in subsets:
        triple = [scores_by_subset[subset][mode] for mode in gap_modes]
        gaps[subset] = gap_metrics(*triple, n_resamples=n_resamples, seed=seed, alpha=alpha)
        per_subset_terms.append(GapScores(*triple).per_item_gaps())
    cis = None
    if n_resamples > 0:
        cis = {}
        for name in GAP_NAMES:
            macro = [
                resampled_means(terms[name], n_resamples, seed + k)
                for k, terms in enumerate(per_subset_terms)
            ]
            estimate = sum(float(terms[name].mean()) for terms in per_subset_terms) / len(subsets)
            cis[name] = percentile_ci(estimate, np.mean(macro, axis=0), alpha)
    overall_gaps = _gaps_from_means(*(overall[mode] for mode in gap_modes), sum(n_items.values()), cis)
    return SubsetSummary(subsets, n_items, means, overall, gaps, overall_gaps)
