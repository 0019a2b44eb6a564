"""Distillation losses on response rows: cross-entropy, KL / JSD at temperature τ, sparse top-k KL, chunked.

The method's loss per response token i of the teacher's answer ŷ is
    CE(ŷ_i | prompt, ŷ<i; θ_s) + λ·τ²·D(p_T(·|Q_t, ŷ<i)/τ ‖ p_S(·|prompt, ŷ<i)/τ),
where the student's prompt is text (T→T) or speech (S→T) and the teacher always reads the text. The prompts differ
in length, so every function here works on *response rows*: tensors already gathered to [N, V] logits (or [N, H]
hidden states plus the LM head) with `gather_response_rows`, N = response tokens in the micro-batch.

Normalisation contract: every loss here returns a SUM over response tokens, never a mean. A per-micro-batch mean
weights a token in a short micro-batch more than one in a long micro-batch, and a per-rank mean does the same across
ranks (the gradient-accumulation bug TRL fixed in #6006). The training loop divides each micro-batch's sum by the
number of response tokens in the whole optimizer step (all accumulated micro-batches, all ranks), counted before the
first backward, with `normalise(total_sum, n_tokens_global, world_size)`; `world_size` undoes DDP/FSDP's gradient
averaging. The result is the exact per-token mean over the global batch, whatever the split.

Where the pieces live: this module is the combined training loss (`kd_loss`, `chunked_kd_loss`, `normalise`) and
the one import point for every name in `__all__`. Input types and validation are in `losses_inputs`, the dense
divergences and CE in `losses_dense`, the sparse top-k KL and the cache's top-k definition in `losses_topk`, and
row gathering and channel alignment in `losses_align`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cmkd.errors import UserError
from cmkd.losses_align import check_aligned, gather_response_rows, shift_for_prediction
from cmkd.losses_dense import compute_dtype, dense_divergence, divergence_rows, token_ce
from cmkd.losses_inputs import (
    IGNORE_INDEX,
    TeacherRows,
    TopKTeacher,
    check_2d,
    check_divergence,
    check_teacher_rows,
    check_temperature,
    check_weight,
)
from cmkd.losses_topk import sparse_forward_kl, sparse_forward_kl_rows, teacher_topk
from cmkd.stage_configs import Divergence

__all__ = [
    "IGNORE_INDEX",
    "Divergence",
    "KDLossParts",
    "TeacherRows",
    "TopKTeacher",
    "check_aligned",
    "chunked_kd_loss",
    "dense_divergence",
    "gather_response_rows",
    "kd_loss",
    "normalise",
    "shift_for_prediction",
    "sparse_forward_kl",
    "teacher_topk",
    "token_ce",
]


@dataclass(frozen=True)
class KDLossParts:
    """The summed terms of one micro-batch; divide by the global token count with `normalise` before backward.

    Kept apart (not only `total`) so the loop can log CE and KD separately: CE alone tells forgetting from
    imitation, and the ablations switch each term off.
    """

    ce: torch.Tensor  # [] Σ over counted rows of −log p_S(target) at τ = 1
    kd: torch.Tensor  # [] Σ over counted rows of the divergence at τ, already multiplied by τ²
    total: torch.Tensor  # [] ce_weight·ce + kd_weight·kd
    n_tokens: torch.Tensor  # [] int64, rows whose target is not ignore_index


# ---------------------------------------------------------------------------------------------------------------
# The combined loss: CE + τ²·KD on response rows, whole or chunked, then normalised
# ---------------------------------------------------------------------------------------------------------------


def _loss_sums(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    temperature: float,
    divergence: Divergence,
    jsd_beta: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, τ²·Σ divergence) over the rows whose target is not ignore_index; the core of every public loss.

    The teacher arrives as three optional tensors rather than a `TeacherRows` so that `checkpoint` sees plain
    tensor arguments. The teacher is detached: it is a fixed target, and if teacher and student share base
    weights a KD gradient must never reach them through the teacher pass.
    """
    teachers = [t for t in (teacher_logits, topk_logprobs) if t is not None]
    dtype = compute_dtype(student_logits, *teachers)
    logits = student_logits.to(dtype)  # [N, V] in ≥ fp32
    ce_sum = F.cross_entropy(
        logits, targets.long(), ignore_index=ignore_index, reduction="sum"
    )  # [N, V] -> []
    if teacher_logits is None and topk_ids is None:
        return ce_sum, logits.new_zeros(())
    student_logp = F.log_softmax(logits / temperature, dim=-1)  # [N, V]
    if topk_ids is not None and topk_logprobs is not None:
        kd_rows = sparse_forward_kl_rows(
            student_logp, topk_ids.long(), topk_logprobs.detach().to(dtype)
        )  # [N, V], [N, k] -> [N]
    else:
        assert teacher_logits is not None
        teacher_logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # [N, V]
        kd_rows = divergence_rows(student_logp, teacher_logp, divergence, jsd_beta)  # [N, V] -> [N]
    counted = targets != ignore_index  # [N] bool
    kd_sum = torch.where(counted, kd_rows, torch.zeros_like(kd_rows)).sum() * temperature**2  # [N] -> []
    return ce_sum, kd_sum


def _split_teacher(
    teacher: TeacherRows | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    if teacher is None:
        return None, None, None
    if isinstance(teacher, TopKTeacher):
        return None, teacher.ids, teacher.logprobs
    return teacher, None, None


def _check_kd_call(
    n_rows: int,
    vocab_size: int,
    targets: torch.Tensor,
    teacher: TeacherRows | None,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    divergence: Divergence | str,
    jsd_beta: float,
) -> Divergence:
    check_temperature(temperature)
    check_weight("kd_weight", kd_weight)
    check_weight("ce_weight", ce_weight)
    divergence = check_divergence(divergence, jsd_beta)
    if targets.shape != (n_rows,):
        raise ValueError(f"targets: expected shape ({n_rows},), got {tuple(targets.shape)}")
    if teacher is not None:
        check_teacher_rows(teacher, n_rows, vocab_size)
        if isinstance(teacher, TopKTeacher) and divergence is not Divergence.FORWARD_KL:
            raise UserError(
                f"divergence: {divergence.value} needs dense teacher logits; a top-k cache supports only forward_kl"
            )
    return divergence


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherRows | None,
    *,
    temperature: float,
    kd_weight: float,
    ce_weight: float = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    jsd_beta: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> KDLossParts:
    """CE on ŷ plus τ²-scaled divergence to the teacher, summed over response rows: [N, V], [N], teacher -> parts.

    `teacher` is dense logits [N, V], a `TopKTeacher` (forward KL only), or None (CE only: the "gold CE, no KL"
    ablation runs through the same call). A row whose target is `ignore_index` counts in neither term. For long
    responses and big vocabularies use `chunked_kd_loss`, which never holds [N, V] fp32 logits.
    """
    check_2d("student_logits", student_logits)
    n_rows, vocab_size = student_logits.shape
    divergence = _check_kd_call(
        n_rows, vocab_size, targets, teacher, temperature, kd_weight, ce_weight, divergence, jsd_beta
    )
    ce_sum, kd_sum = _loss_sums(
        student_logits, targets, *_split_teacher(teacher), temperature, divergence, jsd_beta, ignore_index
    )
    return KDLossParts(
        ce=ce_sum,
        kd=kd_sum,
        total=ce_weight * ce_sum + kd_weight * kd_sum,
        n_tokens=(targets != ignore_index).sum(),
    )


def _chunk_loss_sums(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    temperature: float,
    divergence: Divergence,
    jsd_beta: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: project hidden states to logits, then `_loss_sums`. The unit `checkpoint` recomputes."""
    # The projection runs in the weights' dtype and is upcast after, exactly as the model's own lm_head(h).float():
    # the chunked loss then sees the same logits as generation and evaluation, and no fp32 copy of a [V, H]
    # weight is made per chunk (GPU matmuls accumulate in fp32 anyway).
    student_logits = F.linear(student_hidden, lm_head_weight, lm_head_bias)  # [C, H] -> [C, V]
    return _loss_sums(
        student_logits,
        targets,
        teacher_logits,
        topk_ids,
        topk_logprobs,
        temperature,
        divergence,
        jsd_beta,
        ignore_index,
    )


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherRows | None,
    *,
    temperature: float,
    kd_weight: float,
    ce_weight: float = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    jsd_beta: float = 0.5,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    ignore_index: int = IGNORE_INDEX,
) -> KDLossParts:
    """`kd_loss` from final hidden states, chunk_size rows at a time: [N, H], [V, H], [N], teacher -> parts.

    Student logits for all N rows in fp32 are N·V·4 bytes (4 GB at N = 8k, V = 128k) before softmax temporaries,
    so rows are projected chunk by chunk and each chunk runs under `torch.utils.checkpoint`: backward recomputes
    the chunk's logits (one more matmul) instead of storing them, and peak memory is a few [chunk_size, V] fp32
    tensors. Values and gradients (hidden, weight, bias) equal `kd_loss` on `F.linear(hidden, weight, bias)`.

    Feed the LM's final hidden states (after its last norm) gathered at the prediction positions, and the weight
    and bias of its output head (tied to the embeddings in many small LMs; pass that tensor). Teacher and student
    vocab sizes must be equal: where one is only padded, slice both before calling. No final-logit soft-capping.
    """
    check_2d("student_hidden", student_hidden)
    check_2d("lm_head_weight", lm_head_weight)
    if chunk_size < 1:
        raise UserError(f"chunk_size: must be >= 1, got {chunk_size}")
    n_rows, hidden_size = student_hidden.shape
    vocab_size, weight_hidden_size = lm_head_weight.shape
    if weight_hidden_size != hidden_size:
        raise ValueError(
            f"lm_head_weight: hidden size {weight_hidden_size} differs from student_hidden's {hidden_size}"
        )
    if lm_head_bias is not None and lm_head_bias.shape != (vocab_size,):
        raise ValueError(f"lm_head_bias: expected shape ({vocab_size},), got {tuple(lm_head_bias.shape)}")
    divergence = _check_kd_call(
        n_rows, vocab_size, targets, teacher, temperature, kd_weight, ce_weight, divergence, jsd_beta
    )
    teacher_logits, topk_ids, topk_logprobs = _split_teacher(teacher)
    n_tokens = (targets != ignore_index).sum()
    if n_rows == 0:
        # A zero still wired to the weights, so this rank's backward touches the same parameters as every other
        # rank's (DDP waits for all of them) even when its micro-batch holds no response token.
        params = [student_hidden, lm_head_weight] + ([lm_head_bias] if lm_head_bias is not None else [])
        zero = sum((p.sum() for p in params), torch.zeros((), dtype=compute_dtype(*params))) * 0.0
        return KDLossParts(ce=zero, kd=zero, total=zero, n_tokens=n_tokens)

    ce_sum: torch.Tensor | None = None
    kd_sum: torch.Tensor | None = None
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_args = (
            student_hidden[rows],  # [C, H]
            lm_head_weight,
            lm_head_bias,
            targets[rows],  # [C]
            None if teacher_logits is None else teacher_logits[rows],  # [C, V]
            None if topk_ids is None else topk_ids[rows],  # [C, k]
            None if topk_logprobs is None else topk_logprobs[rows],  # [C, k]
            temperature,
            divergence,
            jsd_beta,
            ignore_index,
        )
        if torch.is_grad_enabled():
            chunk_ce, chunk_kd = checkpoint(
                _chunk_loss_sums, *chunk_args, use_reentrant=False, preserve_rng_state=False
            )
        else:
            chunk_ce, chunk_kd = _chunk_loss_sums(*chunk_args)
        ce_sum = chunk_ce if ce_sum is None else ce_sum + chunk_ce
        kd_sum = chunk_kd if kd_sum is None else kd_sum + chunk_kd
    assert ce_sum is not None and kd_sum is not None
    return KDLossParts(ce=ce_sum, kd=kd_sum, total=ce_weight * ce_sum + kd_weight * kd_sum, n_tokens=n_tokens)


def normalise(
    total_sum: torch.Tensor, n_tokens_global: int | torch.Tensor, world_size: int = 1
) -> torch.Tensor:
    """A micro-batch's summed loss divided by the response tokens of the whole optimizer step: [] -> [].

    `n_tokens_global` counts every response token of every accumulated micro-batch on every rank (sum the
    `n_tokens` of all micro-batches, then all-reduce with SUM), known before the first backward. Backward on each
    micro-batch's result then accumulates the exact global per-token mean. DDP and FSDP AVERAGE gradients over
    ranks, so pass their `world_size` to undo that division; leave it at 1 where gradients are summed, and do not
    also divide by the accumulation steps (Accelerate's `backward` does that when its gradient_accumulation_steps
    is > 1: build the Accelerator with 1 and step manually). A step with no response tokens anywhere gives 0.
    """
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    if isinstance(n_tokens_global, torch.Tensor):
        denominator = n_tokens_global.to(total_sum.dtype).clamp_min(1.0)  # [] float
        return total_sum * world_size / denominator
    if n_tokens_global < 0:
        raise ValueError(f"n_tokens_global: must be >= 0, got {n_tokens_global}")
    return total_sum * world_size / max(n_tokens_global, 1)
