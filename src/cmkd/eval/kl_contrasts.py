"""Paired contrasts of teacher-forced KL between modes: did training move a student towards the teacher, and does
the speech path beat its controls?

Why a separate measure from the gaps: accuracy-style scores are coarse on a few hundred short answers, while the
per-token KL of the student's distribution from the teacher's, on the teacher's own response, moves with every
bit of behaviour the student keeps or loses. Each contrast is `b − a` per item (lower KL is closer to the teacher),
over the items both modes answered with the same clip (same item id, and the same voice where both modes are
spoken), with a paired-bootstrap 95% CI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmkd.eval.metrics import POINTS, bootstrap_mean_ci

Rows = Mapping[tuple[str, str], Mapping[str, Any]]


def _kl_by_key(rows: Rows, voice: str | None) -> dict[str, float]:
    """{item id: KL per token} for one voice (None: a text mode, one row per item)."""
    values = {}
    for (item_id, row_voice), row in rows.items():
        kl = row.get("kl")
        if kl is None or (voice is not None and row_voice != voice):
            continue
        values[item_id] = float(kl)
    return values


def _voices(rows: Rows) -> list[str]:
    return sorted({voice for _, voice in rows if voice})


def planned_contrasts(modes: Sequence[str], extras: Sequence[str]) -> list[tuple[str, str]]:
    """(before, after) mode pairs: each extra student against the main one, and the speech path's controls."""
    pairs = [(f"{name}.text", "student.text") for name in extras]
    pairs += [(f"{name}.speech", "student.speech") for name in extras]
    pairs += [("student.mismatched", "student.speech"), ("cascade.asr", "student.speech")]
    return [(a, b) for a, b in pairs if a in modes and b in modes]


def kl_contrasts(
    rows_by_mode: Mapping[str, Rows], extras: Sequence[str], *, n_resamples: int, seed: int
) -> list[dict[str, Any]]:
    """One entry per contrast (and per voice where the modes are spoken): means, difference b − a and its CI."""
    results = []
    for before, after in planned_contrasts(list(rows_by_mode), extras):
        rows_a, rows_b = rows_by_mode[before], rows_by_mode[after]
        voices_a, voices_b = _voices(rows_a), _voices(rows_b)
        voices: list[str | None] = [v for v in voices_b if v in voices_a] if voices_a and voices_b else [None]
        for voice in voices:
            a = _kl_by_key(rows_a, voice if voices_a else None)
            b = _kl_by_key(rows_b, voice if voices_b else None)
            ids = sorted(set(a) & set(b))
            if len(ids) < 2:
                continue
            values_a = np.array([a[i] for i in ids])
            values_b = np.array([b[i] for i in ids])
            # bootstrap_mean_ci reports points (x POINTS); KL is in nats per token, so scale back.
            ci = bootstrap_mean_ci(values_b - values_a, n_resamples=n_resamples, seed=seed, alpha=0.05)
            label = f"[{voice}]" if voice else ""
            results.append(
                {
                    "contrast": f"{before}{label} -> {after}{label}",
                    "n": len(ids),
                    "kl_before": float(values_a.mean()),
                    "kl_after": float(values_b.mean()),
                    "difference": float((values_b - values_a).mean()),
                    "ci": {"low": ci.low / POINTS, "high": ci.high / POINTS},
                }
            )
    return results
