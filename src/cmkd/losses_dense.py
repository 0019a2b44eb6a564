"""Dense divergences between full [N, V] distributions at temperature τ: forward KL, reverse KL, JSD; and CE.

Why this module exists: it holds the row-wise maths every loss builds on (the ≥ fp32 compute dtype, the
0·log 0 = 0 weighted log-ratio that the sparse top-k KL reuses, the per-row divergence with its JSD scaling) and
the two dense public functions that are checked against closed forms. `losses.kd_loss` combines these rows with
CE and τ²; every function here returns a sum over rows (see `losses` for that contract).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmkd.losses_inputs import IGNORE_INDEX, check_2d, check_divergence, check_teacher_rows, check_temperature
from cmkd.stage_configs import Divergence

# ---------------------------------------------------------------------------------------------------------------
# Row-wise maths (no validation; shared by the public functions, the sparse KL and the combined loss)
# ---------------------------------------------------------------------------------------------------------------


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: softmax over 10^5 classes in bf16/fp16 loses the small probabilities KD is about."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def weighted_log_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p·(log p − log q) along the last dim, with 0·log 0 = 0.

    The ratio is zeroed where p = 0 BEFORE the product, so a −inf log-prob (a masked or padded token) gives neither
    a NaN value nor a NaN gradient (0·inf in backward).
    """
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))  # [..., V]
    return (p * log_ratio).sum(dim=-1)  # [..., V] -> [...]


def divergence_rows(
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
        return weighted_log_ratio(teacher_logp.exp(), teacher_logp, student_logp)  # [N, V] -> [N]
    if divergence is Divergence.REVERSE_KL or (divergence is Divergence.JSD and jsd_beta == 1.0):
        return weighted_log_ratio(student_logp.exp(), student_logp, teacher_logp)  # [N, V] -> [N]
    # Clamp −inf to the lowest finite value inside the mixture only: logaddexp(−inf, −inf) has a NaN gradient.
    lowest = torch.finfo(student_logp.dtype).min
    mixture_logp = torch.logaddexp(
        teacher_logp.clamp_min(lowest) + math.log(jsd_beta),
        student_logp.clamp_min(lowest) + math.log1p(-jsd_beta),
    )  # [N, V]
    teacher_to_mixture = weighted_log_ratio(teacher_logp.exp(), teacher_logp, mixture_logp)  # [N, V] -> [N]
    student_to_mixture = weighted_log_ratio(student_logp.exp(), student_logp, mixture_logp)  # [N, V] -> [N]
    return teacher_to_mixture / (1.0 - jsd_beta) + student_to_mixture / jsd_beta


# ---------------------------------------------------------------------------------------------------------------
# Public dense losses
# ---------------------------------------------------------------------------------------------------------------


def token_ce(
    student_logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Σ −log p_S(target) over response rows at τ = 1: [N, V], [N] -> [] (a sum; see the module's contract)."""
    check_2d("student_logits", student_logits)
    logits = student_logits.to(compute_dtype(student_logits))  # [N, V] in ≥ fp32
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
    gradient scale independent of τ, as in Hinton et al.). See `divergence_rows` for the JSD scaling and ends.
    """
    check_temperature(temperature)
    divergence = check_divergence(divergence, jsd_beta)
    check_2d("student_logits", student_logits)
    check_teacher_rows(teacher_logits, student_logits.shape[0], student_logits.shape[1])
    dtype = compute_dtype(student_logits, teacher_logits)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    teacher_logp = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # [N, V]
    return divergence_rows(student_logp, teacher_logp, divergence, jsd_beta).sum()  # [N] -> []
