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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cmkd.errors import UserError
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
# Validation: bad values a user can set in a config raise UserError naming the field
# ---------------------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"temperature: must be a finite number > 0, got {temperature}")


def _check_divergence(divergence: Divergence | str, jsd_beta: float) -> Divergence:
    if not (math.isfinite(jsd_beta) and 0.0 <= jsd_beta <= 1.0):
        raise UserError(f"jsd_beta: must lie in [0, 1], got {jsd_beta}")
    try:
        return Divergence(divergence)
    except ValueError:
        known = ", ".join(d.value for d in Divergence)
        raise UserError(f"divergence: unknown value {divergence!r}; known: {known}") from None


def _check_weight(name: str, weight: float) -> None:
    if not (math.isfinite(weight) and weight >= 0):
        raise UserError(f"{name}: must be a finite number >= 0, got {weight}")


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected response rows [N, D], got shape {tuple(tensor.shape)}")


def _check_teacher_rows(teacher: TeacherRows, n_rows: int, vocab_size: int) -> None:
    """Check that the teacher scores the same N response tokens over the same vocabulary as the student."""
    if isinstance(teacher, TopKTeacher):
        ids, logprobs = teacher
        _check_2d("topk_ids", ids)
        _check_2d("topk_logprobs", logprobs)
        if ids.shape != logprobs.shape:
            raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_logprobs {tuple(logprobs.shape)} differ")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"topk_ids: expected an integer dtype, got {ids.dtype}")
        rows, k = ids.shape
        name = "topk_ids"
    else:
        _check_2d("teacher_logits", teacher)
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


# ---------------------------------------------------------------------------------------------------------------
# Row-wise maths (no validation; shared by the public functions and the chunked path)
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: softmax over 10^5 classes in bf16/fp16 loses the small probabilities KD is about."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _weighted_log_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p·(log p − log q) along the last dim, with 0·log 0 = 0.

    The ratio is zeroed where p = 0 BEFORE the product, so a −inf log-prob (a masked or padded token) gives neither
    a NaN value nor a NaN gradient (0·inf in backward).
    """
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))  # [..., V]
    return (p * log_ratio).sum(dim=-1)  # [..., V] -> [...]


def _divergence_rows(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, divergence: Divergence, jsd_beta: float
) -> torch.Tensor:
    """Per-row divergence between two log-distributions [N, V] -> [N] (no τ², no reduction over rows).

    JSD is the generalized JSD of GKD (Agarwal et al.) with mixture M = β·p_T + (1−β)·p_S, divided by β·(1−β):
        JSD_β = KL(p_T‖M)/(1−β) + KL(p_S‖M)/β.
    The unscaled form β·KL(p_T‖M) + (1−β)·KL(p_S‖M) goes to 0 at both ends (it is O(β) near β = 0), so a β near
    an end would silently switch distillation off; scaled, it is continuous on [0, 1] with
    β → 0 giving the forward KL(p_T‖p_S) and β → 1 the reverse KL(p_S‖p_T) (TRL's convention for the ends),
    and the ends are computed exactly as those KLs. At β = 0.5 it is 4× the textbook JSD (bounded by 4·ln 2).
    """
    if divergence is Divergence.FORWARD_KL or (divergence is Divergence.JSD and jsd_beta == 0.0):
        return _weighted_log_ratio(teacher_logp.exp(), teacher_logp, student_logp)  # [N, V] -> [N]
    if divergence is Divergence.REVERSE_KL or (divergence is Divergence.JSD and jsd_beta == 1.0):
        return _weighted_log_ratio(student_logp.exp(), student_logp, teacher_logp)  # [N, V] -> [N]
    # Clamp −inf to the lowest finite value inside the mixture only: logaddexp(−inf, −inf) has a NaN gradient.
    lowest = torch.finfo(student_logp.dtype).min
    mixture_logp = torch.logaddexp(
        teacher_logp.clamp_min(lowest) + math.log(jsd_beta),
        student_logp.clamp_min(lowest) + math.log1p(-jsd_beta),
    )  # [N, V]
    teacher_to_mixture = _weighted_log_ratio(teacher_logp.exp(), teacher_logp, mixture_logp)  # [N, V] -> [N]
    student_to_mixture = _weighted_log_ratio(student_logp.exp(), student_logp, mixture_logp)  # [N, V] -> [N]
    return teacher_to_mixture / (1.0 - jsd_beta) + student_to_mixture / jsd_beta


def _sparse_forward_kl_rows(
    student_logp: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Forward KL over the k kept tokens plus one tail bucket, per row: [N, V], [N, k], [N, k] -> [N].

    Merging the untracked tokens into one bucket on both sides makes this the exact KL of the two (k+1)-way
    distributions, a lower bound of the dense KL (data processing) that tightens as k grows and equals it at k = V.
    """
    vocab_size = student_logp.shape[-1]
    student_kept_logp = student_logp.gather(-1, topk_ids)  # [N, V] -> [N, k]
    kept = _weighted_log_ratio(topk_logprobs.exp(), topk_logprobs, student_kept_logp)  # [N, k] -> [N]
    if topk_ids.shape[-1] == vocab_size:
        # Every token is kept: both tails are exactly empty, and rounding residue must not become a bucket.
        return kept
    # Student tail: logsumexp over the complement directly, not log(1 − Σp), which cancels catastrophically when
    # the kept tokens hold nearly all the mass.
    student_tail_logp = student_logp.scatter(-1, topk_ids, float("-inf")).logsumexp(dim=-1)  # [N, V] -> [N]
    # Teacher tail: only the kept log-probs exist; −expm1(log Σp) is 1 − Σp without cancellation. Clamp the
    # rounding residue (Σp a hair above 1) to an empty tail.
    teacher_tail = (-torch.expm1(topk_logprobs.logsumexp(dim=-1))).clamp_min(0.0)  # [N, k] -> [N]
    tail = _weighted_log_ratio(
        teacher_tail.unsqueeze(-1), teacher_tail.log().unsqueeze(-1), student_tail_logp.unsqueeze(-1)
    )  # [N, 1] -> [N]
    return kept + tail


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
    dtype = _compute_dtype(student_logits, *teachers)
    logits = student_logits.to(dtype)  # [N, V] in ≥ fp32
    ce_sum = F.cross_entropy(
        logits, targets.long(), ignore_index=ignore_index, reduction="sum"
    )  # [N, V] -> []
    if teacher_logits is None and topk_ids is None:
        return ce_sum, logits.new_zeros(())
    student_logp = F.log_softmax(logits / temperature, dim=-1)  # [N, V]
    if topk_ids is not None and topk_logprobs is not None:
        kd_rows = _sparse_forward_kl_rows(
            student_logp, topk_ids.long(), topk_logprobs.detach().to(dtype)
        )  # [N, V], [N, k] -> [N]
    else:
        assert teacher_logits is not None
        teacher_logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # [N, V]
        kd_rows = _divergence_rows(student_logp, teacher_logp, divergence, jsd_beta)  # [N, V] -> [N]
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


# ---------------------------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------------------------


def token_ce(
    student_logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Σ −log p_S(target) over response rows at τ = 1: [N, V], [N] -> [] (a sum; see the module's contract)."""
    _check_2d("student_logits", student_logits)
    logits = student_logits.to(_compute_dtype(student_logits))  # [N, V] in ≥ fp32
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")  # [N, V] -> []


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    divergence: Divergence = Divergence.FORWARD_KL,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Σ over rows of D(p_T/τ ‖ p_S/τ): [N, V], [N, V] -> [], in ≥ fp32, WITHOUT the τ² factor.

    The pure divergence, so it can be checked against closed forms; `kd_loss` multiplies by τ² (which keeps the
    gradient scale independent of τ, as in Hinton et al.). See `_divergence_rows` for the JSD scaling and ends.
    """
    _check_temperature(temperature)
    divergence = _check_divergence(divergence, jsd_beta)
    _check_2d("student_logits", student_logits)
    _check_teacher_rows(teacher_logits, student_logits.shape[0], student_logits.shape[1])
    dtype = _compute_dtype(student_logits, teacher_logits)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    teacher_logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # [N, V]
    return _divergence_rows(student_logp, teacher_logp, divergence, jsd_beta).sum()  # [N] -> []


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    """The teacher's k most likely tokens per row at temperature τ: [N, V] -> ids [N, k] int32, logprobs [N, k].

    The one definition shared by the cache writer and the loss: log-softmax over the FULL vocabulary at τ first,
    then top-k, so the kept log-probs leave the true tail mass 1 − Σp for the sparse KL. Logprobs are fp32 (fp64
    if the logits are fp64), sorted by descending probability. The cache is therefore tied to τ.
    """
    _check_temperature(temperature)
    _check_2d("teacher_logits", teacher_logits)
    vocab_size = teacher_logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise UserError(f"k: must lie in [1, {vocab_size}] (the vocab size), got {k}")
    with torch.no_grad():
        logits = teacher_logits.to(_compute_dtype(teacher_logits))  # [N, V] in ≥ fp32
        logprobs = F.log_softmax(logits / temperature, dim=-1)  # [N, V]
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, V] -> [N, k], [N, k]
    return TopKTeacher(ids=top_ids.to(torch.int32), logprobs=top_logprobs)


def sparse_forward_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Σ over rows of KL(p_T/τ ‖ p_S/τ) from the teacher's top-k plus a tail bucket: [N, V], [N, k], [N, k] -> [].

    `topk_logprobs` must be log p_T at this same τ over the full vocabulary (as `teacher_topk` makes them): a
    cache cannot be re-tempered, since the tail's shape is unknown. No τ² factor (see `dense_divergence`). Equals
    the dense forward KL at k = V and is a lower bound below that; forward KL only, because the reverse KL and JSD
    weight the tail by the student's mass, where a cut teacher tail is not a fair stand-in.
    """
    _check_temperature(temperature)
    _check_2d("student_logits", student_logits)
    topk = TopKTeacher(topk_ids, topk_logprobs)
    _check_teacher_rows(topk, student_logits.shape[0], student_logits.shape[1])
    dtype = _compute_dtype(student_logits, topk_logprobs)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    kl_rows = _sparse_forward_kl_rows(
        student_logp, topk_ids.long(), topk_logprobs.detach().to(dtype)
    )  # [N, V], [N, k] -> [N]
    return kl_rows.sum()  # [N] -> []


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
    _check_temperature(temperature)
    _check_weight("kd_weight", kd_weight)
    _check_weight("ce_weight", ce_weight)
    divergence = _check_divergence(divergence, jsd_beta)
    if targets.shape != (n_rows,):
        raise ValueError(f"targets: expected shape ({n_rows},), got {tuple(targets.shape)}")
    if teacher is not None:
        _check_teacher_rows(teacher, n_rows, vocab_size)
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
    _check_2d("student_logits", student_logits)
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
    chunk_size: int = 1024,
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
    _check_2d("student_hidden", student_hidden)
    _check_2d("lm_head_weight", lm_head_weight)
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
        zero = sum((p.sum() for p in params), torch.zeros((), dtype=_compute_dtype(*params))) * 0.0
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


# ---------------------------------------------------------------------------------------------------------------
# Channel alignment: both channels score the same response ŷ after prompts of different lengths
# ---------------------------------------------------------------------------------------------------------------


def shift_for_prediction(response_token_mask: torch.Tensor) -> torch.Tensor:
    """Mask of the positions whose logits PREDICT a response token: [B, T] bool -> [B, T] bool.

    A causal LM's logits at position t predict the token at t + 1, so the prediction mask is the token mask moved
    one step left. Convention used by every loss input in cmkd: "response mask" means prediction positions. Gather
    logits or hidden states with the prediction mask and the targets with the token mask; row j of both is then
    response token j (`gather_response_rows(input_ids, response_token_mask)` gives the targets [N]).
    """
    if response_token_mask.dim() != 2 or response_token_mask.dtype != torch.bool:
        raise ValueError(
            f"response_token_mask: expected [B, T] bool, got {tuple(response_token_mask.shape)} "
            f"{response_token_mask.dtype}"
        )
    first_column = response_token_mask[:, 0]  # [B, T] -> [B]
    if bool(first_column.any()):
        example = int(first_column.nonzero()[0, 0])
        raise UserError(
            f"response_mask: example {example} has a response token at position 0, which nothing predicts; "
            "the prompt was truncated away"
        )
    prediction_mask = torch.zeros_like(response_token_mask)  # [B, T]
    prediction_mask[:, :-1] = response_token_mask[:, 1:]  # token at t + 1 -> logits at t
    return prediction_mask


def gather_response_rows(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Response rows of a batch, example by example in position order: [B, T, *D] and [B, T] bool -> [N, *D].

    Works for logits [B, T, V], hidden states [B, T, H] and token ids [B, T] -> [N]. The order (examples in batch
    order, positions ascending) is the same for any prompt length, so a text-prompted and a speech-prompted batch
    of the same responses give row-for-row aligned tensors; `check_aligned` guards that the counts agree.
    """
    if response_mask.dtype != torch.bool or response_mask.shape != values.shape[:2]:
        raise ValueError(
            f"response_mask: expected bool of shape {tuple(values.shape[:2])}, got "
            f"{response_mask.dtype} {tuple(response_mask.shape)}"
        )
    return values[response_mask]  # [B, T, *D] -> [N, *D]


def check_aligned(
    student_mask: torch.Tensor, teacher_mask: torch.Tensor, example_ids: Sequence[str] | None = None
) -> None:
    """Raise UserError unless every example has as many student response positions as teacher ones.

    [B, T_s] and [B, T_t] bool masks; T_s ≠ T_t is expected (text tokens vs audio frames in the prompt). Equal
    counts per example is what makes the gathered rows line up one to one; different counts mean the two inputs
    do not hold the same ŷ (chat template, tokenization or truncation differ). `example_ids` (record ids) make
    the message point at the data.
    """
    if student_mask.dim() != 2 or teacher_mask.dim() != 2:
        raise ValueError(
            f"check_aligned: expected [B, T] masks, got {tuple(student_mask.shape)} and {tuple(teacher_mask.shape)}"
        )
    if student_mask.shape[0] != teacher_mask.shape[0]:
        raise UserError(
            f"response_mask: student batch has {student_mask.shape[0]} examples, teacher batch {teacher_mask.shape[0]}"
        )
    student_counts = student_mask.sum(dim=1).tolist()  # [B, T_s] -> [B]
    teacher_counts = teacher_mask.sum(dim=1).tolist()  # [B, T_t] -> [B]
    mismatched = [i for i, (s, t) in enumerate(zip(student_counts, teacher_counts, strict=True)) if s != t]
    if mismatched:
        first = mismatched[0]
        name = f"example {first}" + (f" (id {example_ids[first]})" if example_ids is not None else "")
        more = f"; {len(mismatched) - 1} more example(s) differ" if len(mismatched) > 1 else ""
        raise UserError(
            f"response_mask: {name} has {student_counts[first]} student response positions but "
            f"{teacher_counts[first]} teacher ones{more}; both channels must score the same response tokens"
        )
