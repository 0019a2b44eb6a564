"""Sparse top-k distillation: the teacher's k most likely tokens per row plus one tail bucket, not [N, V] logits.

Why this module exists: the prepare stage caches only the teacher's top-k (ids and log-probs at τ) to keep the
logit cache small, and the loss must read that cache with exactly the definition that wrote it. `teacher_topk`
(the cache writer's side) and the forward KL over the k kept tokens plus the tail mass (the loss's side) live
together so the two can never disagree on τ or on normalisation over the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmkd.errors import UserError
from cmkd.losses_dense import compute_dtype, weighted_log_ratio
from cmkd.losses_inputs import TopKTeacher, check_2d, check_teacher_rows, check_temperature


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    """The teacher's k most likely tokens per row at temperature τ: [N, V] -> ids [N, k] int32, logprobs [N, k].

    The one definition shared by the cache writer and the loss: log-softmax over the FULL vocabulary at τ first,
    then top-k, so the kept log-probs leave the true tail mass 1 − Σp for the sparse KL. Logprobs are fp32 (fp64
    if the logits are fp64), sorted by descending probability. The cache is therefore tied to τ.
    """
    check_temperature(temperature)
    check_2d("teacher_logits", teacher_logits)
    vocab_size = teacher_logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise UserError(f"k: must lie in [1, {vocab_size}] (the vocab size), got {k}")
    with torch.no_grad():
        logits = teacher_logits.to(compute_dtype(teacher_logits))  # [N, V] in ≥ fp32
        logprobs = F.log_softmax(logits / temperature, dim=-1)  # [N, V]
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, V] -> [N, k], [N, k]
    return TopKTeacher(ids=top_ids.to(torch.int32), logprobs=top_logprobs)


def sparse_forward_kl_rows(
    student_logp: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Forward KL over the k kept tokens plus one tail bucket, per row: [N, V], [N, k], [N, k] -> [N].

    Merging the untracked tokens into one bucket on both sides makes this the exact KL of the two (k+1)-way
    distributions, a lower bound of the dense KL (data processing) that tightens as k grows and equals it at k = V.
    """
    vocab_size = student_logp.shape[-1]
    student_kept_logp = student_logp.gather(-1, topk_ids)  # [N, V] -> [N, k]
    kept = weighted_log_ratio(topk_logprobs.exp(), topk_logprobs, student_kept_logp)  # [N, k] -> [N]
    if topk_ids.shape[-1] == vocab_size:
        # Every token is kept: both tails are exactly empty, and rounding residue must not become a bucket.
        return kept
    # Student tail: logsumexp over the complement directly, not log(1 − Σp), which cancels catastrophically when
    # the kept tokens hold nearly all the mass.
    student_tail_logp = student_logp.scatter(-1, topk_ids, float("-inf")).logsumexp(dim=-1)  # [N, V] -> [N]
    # Teacher tail: only the kept log-probs exist; −expm1(log Σp) is 1 − Σp without cancellation. Clamp the
    # rounding residue (Σp a hair above 1) to an empty tail.
    teacher_tail = (-torch.expm1(topk_logprobs.logsumexp(dim=-1))).clamp_min(0.0)  # [N, k] -> [N]
    tail = weighted_log_ratio(
        teacher_tail.unsqueeze(-1), teacher_tail.log().unsqueeze(-1), student_tail_logp.unsqueeze(-1)
    )  # [N, 1] -> [N]
    return kept + tail


def sparse_forward_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Σ over rows of KL(p_T/τ ‖ p_S/τ) from the teacher's top-k plus a tail bucket: [N, V], [N, k], [N, k] -> [].

    `topk_logprobs` must be log p_T at this same τ over the full vocabulary (as `teacher_topk` makes them): a
    cache cannot be re-tempered, since the tail's shape is unknown. No τ² factor (see `dense_divergence`). Equals
    the dense forward KL at k = V and is a lower bound below that; forward KL only, because the reverse KL and JSD
    weight the tail by the student's mass, where a cut teacher tail is not a fair stand-in.
    """
    check_temperature(temperature)
    check_2d("student_logits", student_logits)
    topk = TopKTeacher(topk_ids, topk_logprobs)
    check_teacher_rows(topk, student_logits.shape[0], student_logits.shape[1])
    dtype = compute_dtype(student_logits, topk_logprobs)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    kl_rows = sparse_forward_kl_rows(
        student_logp, topk_ids.long(), topk_logprobs.detach().to(dtype)
    )  # [N, V], [N, k] -> [N]
    return kl_rows.sum()  # [N] -> []
