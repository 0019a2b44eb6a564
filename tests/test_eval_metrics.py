"""Gap metrics and paired statistics against hand-computed values and closed forms."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from cmkd.errors import UserError
from cmkd.eval import metrics
from cmkd.eval.metrics import (
    GapScores,
    ModeScores,
    flip_rates,
    gap_closure,
    gap_metrics,
    mcnemar,
    paired_bootstrap_ci,
    subset_and_overall,
)

IDS = ("q1", "q2", "q3", "q4")


def mode(name: str, scores: list[float], ids: tuple[str, ...] = IDS) -> ModeScores:
    return ModeScores(name, ids, tuple(scores))


# Teacher 4/4, student text 3/4, student speech 1/4: F = 25, G = 50, total = 75 points.
TEACHER = mode("teacher_text", [1, 1, 1, 1])
STUDENT_TEXT = mode("student_text", [1, 1, 1, 0])
STUDENT_SPEECH = mode("student_speech", [1, 0, 0, 0])


def test_gap_metrics_small_known_case() -> None:
    gaps = gap_metrics(TEACHER, STUDENT_TEXT, STUDENT_SPEECH, n_resamples=0)
    assert (gaps.teacher_text, gaps.student_text, gaps.student_speech) == (100.0, 75.0, 25.0)
    assert (gaps.forgetting, gaps.modality_gap, gaps.total_gap) == (25.0, 50.0, 75.0)
    assert gaps.n_items == 4 and gaps.cis is None


def test_total_gap_is_exactly_forgetting_plus_modality_gap() -> None:
    # Thirds do not add up exactly in floating point; the identity must still hold bitwise.
    ids = tuple(f"q{i}" for i in range(3))
    gaps = gap_metrics(
        mode("t", [1, 1, 0], ids), mode("s", [1, 0, 0.1], ids), mode("p", [0.3, 0, 0], ids), n_resamples=0
    )
    assert gaps.forgetting + gaps.modality_gap == gaps.total_gap
    assert gaps.total_gap == pytest.approx(gaps.teacher_text - gaps.student_speech)


def test_gap_cis_bracket_the_estimates() -> None:
    gaps = gap_metrics(TEACHER, STUDENT_TEXT, STUDENT_SPEECH, n_resamples=500, seed=1)
    assert gaps.cis is not None
    for name in metrics.GAP_NAMES:
        ci = gaps.cis[name]
        assert ci.low <= getattr(gaps, name) <= ci.high
        assert ci.estimate == pytest.approx(getattr(gaps, name))


def test_bootstrap_all_ones_vs_all_zeros_is_degenerate_at_the_difference() -> None:
    ci = paired_bootstrap_ci([1.0] * 50, [0.0] * 50, n_resamples=200, seed=3)
    assert (ci.estimate, ci.low, ci.high) == (100.0, 100.0, 100.0)


def test_bootstrap_single_mean_matches_normal_approximation() -> None:
    values = np.array([1.0, 0.0] * 200)  # 400 items, p = 0.5: se = 0.5 / sqrt(400) = 2.5 points
    ci = paired_bootstrap_ci(values, n_resamples=4000, seed=0)
    half_width = 1.959964 * 2.5
    assert ci.estimate == 50.0
    assert ci.low == pytest.approx(50.0 - half_width, abs=0.6)
    assert ci.high == pytest.approx(50.0 + half_width, abs=0.6)


def test_paired_bootstrap_difference_matches_normal_approximation() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2, 600).astype(float)
    b = np.where(rng.random(600) < 0.8, a, 1 - a)  # mostly the same answers: pairing shrinks the interval
    difference = a - b
    standard_error = 100 * difference.std() / math.sqrt(difference.size)
    ci = paired_bootstrap_ci(a, b, n_resamples=4000, seed=0)
    assert ci.estimate == pytest.approx(100 * difference.mean())
    assert ci.low == pytest.approx(
        ci.estimate - 1.96 * standard_error, abs=0.15 * standard_error * 1.96 + 0.2
    )
    assert ci.high == pytest.approx(
        ci.estimate + 1.96 * standard_error, abs=0.15 * standard_error * 1.96 + 0.2
    )


def test_bootstrap_is_deterministic_by_seed_and_independent_of_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    a, b = rng.random(97), rng.random(97)
    first = paired_bootstrap_ci(a, b, n_resamples=300, seed=5)
    assert paired_bootstrap_ci(a, b, n_resamples=300, seed=5) == first
    assert paired_bootstrap_ci(a, b, n_resamples=300, seed=6) != first
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CELLS_PER_CHUNK", 97 * 7)  # 7 resamples per chunk
    assert paired_bootstrap_ci(a, b, n_resamples=300, seed=5) == first


def test_bootstrap_refuses_bad_settings() -> None:
    with pytest.raises(UserError, match="n_resamples"):
        paired_bootstrap_ci([1.0, 0.0], n_resamples=0)
    with pytest.raises(UserError, match="alpha"):
        paired_bootstrap_ci([1.0, 0.0], alpha=1.5)
    with pytest.raises(UserError, match="non-empty"):
        paired_bootstrap_ci([])


def correct_vectors(
    b01: int, b10: int, both_right: int = 3, both_wrong: int = 2
) -> tuple[list[int], list[int]]:
    a = [0] * b01 + [1] * b10 + [1] * both_right + [0] * both_wrong
    b = [1] * b01 + [0] * b10 + [1] * both_right + [0] * both_wrong
    return a, b


def test_mcnemar_exact_textbook_case() -> None:
    # 1 vs 9 discordant pairs: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    result = mcnemar(*correct_vectors(1, 9))
    assert (result.b01, result.b10, result.method) == (1, 9, "exact")
    assert result.p_value == 22 / 1024
    assert result.statistic == 1.0


def test_mcnemar_exact_balanced_is_capped_at_one() -> None:
    assert mcnemar(*correct_vectors(4, 4)).p_value == 1.0
    assert mcnemar(*correct_vectors(0, 0)).p_value == 1.0


def test_mcnemar_chi_square_branch_with_continuity_correction() -> None:
    # 121 vs 59 discordant pairs: chi2 = (|121 - 59| - 1)^2 / 180 = 3721 / 180.
    result = mcnemar(*correct_vectors(121, 59))
    assert result.method == "chi2_cc"
    assert result.statistic == pytest.approx(3721 / 180)
    # chi2 with 1 df is a squared standard normal: p = 2 * (1 - Phi(sqrt(x))).
    expected = 2 * (1 - statistics.NormalDist().cdf(math.sqrt(3721 / 180)))
    assert result.p_value == pytest.approx(expected, rel=1e-6)
    assert mcnemar(*correct_vectors(13, 12)).method == "chi2_cc"  # 25 discordant: no longer exact


def test_mcnemar_and_flips_need_binary_scores() -> None:
    with pytest.raises(UserError, match="0/1"):
        mcnemar([1.0, 0.5], [1.0, 0.0])
    with pytest.raises(UserError, match="0/1"):
        flip_rates([1.0, 0.0], [0.2, 0.0])


def test_flip_rates() -> None:
    flips = flip_rates(STUDENT_TEXT, mode("student_speech", [1, 0, 1, 1]))
    assert (flips.right_to_wrong, flips.wrong_to_right, flips.n_items) == (0.25, 0.25, 4)


def test_alignment_error_names_the_first_differing_id() -> None:
    shuffled = mode("student_speech", [1, 0, 0, 0], ("q1", "q3", "q2", "q4"))
    with pytest.raises(UserError, match="'q3'.*'q2'"):
        gap_metrics(TEACHER, STUDENT_TEXT, shuffled)
    shorter = mode("student_speech", [1, 0, 0], ("q1", "q2", "q3"))
    with pytest.raises(UserError, match="'q4' has no counterpart"):
        flip_rates(STUDENT_TEXT, shorter)


def test_mode_scores_refuse_empty_duplicate_and_out_of_range() -> None:
    with pytest.raises(UserError, match="no items"):
        ModeScores("student_text", (), ())
    with pytest.raises(UserError, match="'q1' appears more than once"):
        ModeScores("student_text", ("q1", "q1"), (1.0, 0.0))
    with pytest.raises(UserError, match=r"must be in \[0, 1\]"):
        ModeScores("student_text", ("q1",), (2.0,))
    with pytest.raises(UserError, match="2 item ids but 1 scores"):
        ModeScores("student_text", ("q1", "q2"), (1.0,))
    assert ModeScores.from_mapping("m", {"a": 1, "b": 0}).mean_points() == 50.0


def test_gap_closure_between_two_students() -> None:
    before = GapScores(TEACHER, STUDENT_TEXT, STUDENT_SPEECH)  # F 25, G 50, total 75
    after = GapScores(TEACHER, mode("student_text", [1, 1, 1, 1]), mode("student_speech", [1, 1, 0, 1]))
    closure = gap_closure(before, after, n_resamples=200, seed=0)  # after: F 0, G 25, total 25
    assert (closure["forgetting"].absolute, closure["forgetting"].relative) == (25.0, 1.0)
    assert (closure["modality_gap"].before, closure["modality_gap"].after) == (50.0, 25.0)
    assert closure["modality_gap"].relative == 0.5
    assert closure["total_gap"].absolute == 50.0
    assert closure["total_gap"].relative == pytest.approx(2 / 3)
    ci = closure["total_gap"].ci
    assert ci is not None and ci.low <= 50.0 <= ci.high


def test_gap_closure_relative_is_none_without_a_gap_and_items_must_align() -> None:
    no_gap = GapScores(TEACHER, TEACHER, TEACHER)
    assert gap_closure(no_gap, no_gap, n_resamples=0)["forgetting"].relative is None
    other_items = tuple(f"x{i}" for i in range(4))
    elsewhere = GapScores(*(mode(name, [1, 1, 1, 1], other_items) for name in ("t", "s", "p")))
    with pytest.raises(UserError, match="'x0'"):
        gap_closure(no_gap, elsewhere)


def test_subset_and_overall_is_macro_and_lists_its_subsets() -> None:
    two_items = ("a", "b")
    scores = {
        "mmsu": {"teacher_text": TEACHER, "student_text": STUDENT_TEXT, "student_speech": STUDENT_SPEECH},
        "bbh": {  # 2 items: a macro mean weighs it like mmsu's 4
            "teacher_text": mode("teacher_text", [1, 0], two_items),
            "student_text": mode("student_text", [0, 0], two_items),
            "student_speech": mode("student_speech", [0, 0], two_items),
        },
    }
    summary = subset_and_overall(scores, gap_modes=("teacher_text", "student_text", "student_speech"), seed=2)
    assert summary.subsets == ("mmsu", "bbh")
    assert summary.n_items == {"mmsu": 4, "bbh": 2}
    assert summary.means["bbh"]["teacher_text"] == 50.0
    assert summary.overall == {"teacher_text": 75.0, "student_text": 37.5, "student_speech": 12.5}
    overall = summary.overall_gaps
    assert overall is not None and summary.gaps is not None
    assert (overall.forgetting, overall.modality_gap, overall.total_gap) == (37.5, 25.0, 62.5)
    assert summary.gaps["bbh"].forgetting == 50.0
    assert overall.cis is not None and overall.cis["total_gap"].low <= 62.5 <= overall.cis["total_gap"].high


def test_subset_and_overall_refuses_empty_and_mismatched_modes() -> None:
    with pytest.raises(UserError, match="none given"):
        subset_and_overall({})
    with pytest.raises(UserError, match="subset 'bbh': mode 'student_speech' missing"):
        subset_and_overall(
            {
                "mmsu": {"student_text": STUDENT_TEXT, "student_speech": STUDENT_SPEECH},
                "bbh": {"student_text": STUDENT_TEXT},
            }
        )
    with pytest.raises(UserError, match="gap mode 'teacher_text'"):
        subset_and_overall(
            {"mmsu": {"student_text": STUDENT_TEXT}}, gap_modes=("teacher_text", "student_text", "x")
        )


def test_kl_contrasts_pair_items_and_voices_and_scale_the_ci() -> None:
    from cmkd.eval.kl_contrasts import kl_contrasts

    ids = [f"q{i}" for i in range(20)]
    rows = {
        "stage_a.text": {(i, ""): {"kl": 2.0 + 0.01 * n} for n, i in enumerate(ids)},
        "student.text": {(i, ""): {"kl": 0.5 + 0.01 * n} for n, i in enumerate(ids)},
        "student.speech": {(i, v): {"kl": 0.7} for i in ids for v in ("a", "b")},
        "student.mismatched": {(i, "a"): {"kl": 1.7} for i in ids[:10]},
    }
    results = {c["contrast"]: c for c in kl_contrasts(rows, ["stage_a"], n_resamples=200, seed=0)}
    text = results["stage_a.text -> student.text"]
    assert text["n"] == 20 and text["difference"] == pytest.approx(-1.5)
    assert text["ci"]["low"] == pytest.approx(-1.5) and text["ci"]["high"] == pytest.approx(-1.5)  # no spread
    control = results["student.mismatched[a] -> student.speech[a]"]
    assert control["n"] == 10 and control["difference"] == pytest.approx(-1.0)
    assert "student.mismatched[b] -> student.speech[b]" not in results  # no mismatched rows in voice b
