"""What the distillation losses take, and the checks that reject bad input before any maths runs.

Why this module exists: every loss (`losses`, `losses_dense`, `losses_topk`) takes the same response rows and the
same two teacher forms (dense logits or a `TopKTeacher`), and shares one set of validators, so a bad config value
fails with the same UserError naming its field whichever loss is called. The teacher types live here, below the
maths modules, so those can use them without importing the combined loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple, TypeAlias

import torch

from cmkd.errors import UserError
from cmkd.stage_configs import Divergence

IGNORE_INDEX = -100
"""Target value of a row that counts for nothing (neither CE nor KD), as in `F.cross_entropy`."""


class TopKTeacher(NamedTuple):
    """The teacher's k most likely tokens per response row: what the prepare stage caches instead of [N, V] logits.

    `logprobs` are log p_T at the loss temperature τ, normalised over the FULL vocabulary, so Σ exp(logprobs) ≤ 1
    and the remainder is the tail mass the sparse KL keeps as one extra bucket. A NamedTuple so that
    `ids, logprobs = teacher_topk(...)` reads as the pair it is.
    """

    ids: torch.Tensor  # [N, k] integer token ids (int32 on disk)
    logprobs: torch.Tensor  # [N, k] float, log p_T(id | ...) at temperature τ


TeacherRows: TypeAlias = torch.Tensor | TopKTeacher
"""Teacher response rows: dense logits [N, V] (any float dtype) or a `TopKTeacher`."""

# ---------------------------------------------------------------------------------------------------------------
# Validation: bad values a user can set in a config raise UserError naming the field
# ---------------------------------------------------------------------------------------------------------------


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"temperature: must be a finite number > 0, got {temperature}")


def check_divergence(divergence: Divergence | str, jsd_beta: float) -> Divergence:
    if not (math.isfinite(jsd_beta) and 0.0 <= jsd_beta <= 1.0):
        raise UserError(f"jsd_beta: must lie in [0, 1], got {jsd_beta}")
    try:
        return Divergence(divergence)
    except ValueError:
        known = ", ".join(d.value for d in Divergence)
        raise UserError(f"divergence: unknown value {divergence!r}; known: {known}") from None


def check_weight(name: str, weight: float) -> None:
    if not (math.isfinite(weight) and weight >= 0):
        raise UserError(f"{name}: must be a finite number >= 0, got {weight}")


def check_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected response rows [N, D], got shape {tuple(tensor.shape)}")


def check_teacher_rows(teacher: TeacherRows, n_rows: int, vocab_size: int) -> None:
    """Check that the teacher scores the same N response tokens over the same vocabulary as the student."""
    if isinstance(teacher, TopKTeacher):
        ids, logprobs = teacher
        check_2d("topk_ids", ids)
        check_2d("topk_logprobs", logprobs)
        if ids.shape != logprobs.shape:
            raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_logprobs {tuple(logprobs.shape)} differ")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"topk_ids: expected an integer dtype, got {ids.dtype}")
        rows, k = ids.shape
        name = "topk_ids"
    else:
        check_2d("teacher_logits", teacher)
        rows, teacher_vocab = teacher.shape
        name = "teacher_logits"
        if teacher_vocab != vocab_size:
            raise UserError(
                f"teacher_logits: vocab size {teacher_vocab} differs from the student's {vocab_size}; if one is "
                "only padded, slice both to the shared vocabulary before the loss"
            )
    if rows != n_rows:
        raise UserError(
            f"{name}: {rows} teacher response rows but {n_rows} student rows; both channels must score the same "
            "response tokens (check the response masks with check_aligned)"
        )
    if isinstance(teacher, TopKTeacher) and n_rows > 0:
        if k > vocab_size:
            raise UserError(f"topk_ids: k = {k} exceeds the student's vocab size {vocab_size}")
        # One host sync for all three checks: an out-of-range id is a device-side assert on GPU, and logprobs
        # that sum above 1 are raw logits or were cached at another temperature.
        lowest_id, highest_id, top_mass_log = torch.stack(
            [
                teacher.ids.min().double(),
                teacher.ids.max().double(),
                teacher.logprobs.double().logsumexp(dim=-1).max(),  # [N, k] -> [N] -> []
            ]
        ).tolist()
        if lowest_id < 0 or highest_id >= vocab_size:
            raise UserError(
                f"topk_ids: ids must lie in [0, {vocab_size}), found {int(lowest_id)}..{int(highest_id)}"
            )
        if top_mass_log > 1e-3:
            raise UserError(
                f"topk_logprobs: probabilities sum to {math.exp(top_mass_log):.4f} > 1 in a row; expected "
                "log-probabilities normalised over the full vocabulary (see teacher_topk)"
            )
