"""Loss maths against closed forms and naive formulas (design §5, level 1 tests): fast, CPU, mostly float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cmkd import losses
from cmkd.errors import UserError
from cmkd.losses import (
    IGNORE_INDEX,
    Divergence,
    TopKTeacher,
    check_aligned,
    chunked_kd_loss,
    dense_divergence,
    gather_response_rows,
    kd_loss,
    normalise,
    shift_for_prediction,
    sparse_forward_kl,
    teacher_topk,
    token_ce,
)

# Two hand-specified 3-way distributions; the teacher is P, the student Q.
P = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
Q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
# KL(P‖Q) = 0.5·ln(0.5/0.2) + 0.3·ln(0.3/0.5) + 0.2·ln(0.2/0.3)
#         = 0.5·0.9162907 − 0.3·0.5108256 − 0.2·0.4054651 = 0.2238047
KL_P_Q = 0.2238046572
# KL(Q‖P) = 0.2·ln(0.2/0.5) + 0.5·ln(0.5/0.3) + 0.3·ln(0.3/0.2)
#         = −0.2·0.9162907 + 0.5·0.5108256 + 0.3·0.4054651 = 0.1937942
KL_Q_P = 0.1937941979


def logits_at(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is `probs` (so the test exercises the division by τ)."""
    return temperature * probs.log()


def naive_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
) -> torch.Tensor:
    """Direct textbook formulas, row sums, no τ²: the reference the library is checked against."""
    p_t = F.softmax(teacher_logits / temperature, dim=-1)
    p_s = F.softmax(student_logits / temperature, dim=-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1)
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1)
    if divergence is Divergence.FORWARD_KL:
        return forward.sum()
    if divergence is Divergence.REVERSE_KL:
        return reverse.sum()
    mixture = beta * p_t + (1 - beta) * p_s
    jsd = beta * (p_t * (p_t / mixture).log()).sum(-1) + (1 - beta) * (p_s * (p_s / mixture).log()).sum(-1)
    return (jsd / (beta * (1 - beta))).sum()


# ---------------------------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_and_reverse_kl_match_hand_computed_values(temperature: float) -> None:
    student, teacher = logits_at(Q, temperature), logits_at(P, temperature)
    forward = dense_divergence(student, teacher, temperature, Divergence.FORWARD_KL)
    reverse = dense_divergence(student, teacher, temperature, Divergence.REVERSE_KL)
    assert forward.item() == pytest.approx(KL_P_Q, abs=1e-9)
    assert reverse.item() == pytest.approx(KL_Q_P, abs=1e-9)


@pytest.mark.parametrize("divergence", list(Divergence))
def test_divergence_of_a_distribution_with_itself_is_zero(divergence: Divergence) -> None:
    logits = torch.randn(4, 11, dtype=torch.float64)
    assert dense_divergence(logits, logits.clone(), 2.0, divergence, 0.3).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_jsd_matches_the_scaled_generalized_formula_and_the_textbook_jsd() -> None:
    student, teacher = Q.log(), P.log()
    mixture = (P + Q) / 2
    textbook_jsd = 0.5 * (P * (P / mixture).log()).sum() + 0.5 * (Q * (Q / mixture).log()).sum()
    assert textbook_jsd.item() == pytest.approx(0.0508746125, abs=1e-9)
    jsd = dense_divergence(student, teacher, 1.0, Divergence.JSD, 0.5)
    assert jsd.item() == pytest.approx(4 * textbook_jsd.item(), abs=1e-12)  # scaled by 1/(β(1−β)) = 4
    # Symmetric at β = 0.5, bounded by 4·ln 2.
    swapped = dense_divergence(teacher, student, 1.0, Divergence.JSD, 0.5)
    assert swapped.item() == pytest.approx(jsd.item(), abs=1e-12)
    assert jsd.item() < 4 * math.log(2)


@pytest.mark.parametrize("divergence", list(Divergence))
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_divergences_match_direct_formulas_on_random_rows(divergence: Divergence, beta: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 17, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(6, 17, generator=generator, dtype=torch.float64) * 2
    expected = naive_divergence(student, teacher, 1.7, divergence, beta)
    actual = dense_divergence(student, teacher, 1.7, divergence, beta)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_jsd_beta_limits_are_forward_kl_at_zero_and_reverse_kl_at_one() -> None:
    student, teacher = Q.log(), P.log()
    at_zero = dense_divergence(student, teacher, 1.0, Divergence.JSD, 0.0).item()
    at_one = dense_divergence(student, teacher, 1.0, Divergence.JSD, 1.0).item()
    near_zero = dense_divergence(student, teacher, 1.0, Divergence.JSD, 1e-7).item()
    near_one = dense_divergence(student, teacher, 1.0, Divergence.JSD, 1 - 1e-7).item()
    assert at_zero == pytest.approx(KL_P_Q, abs=1e-9)
    assert at_one == pytest.approx(KL_Q_P, abs=1e-9)
    # Continuous at both ends: no jump to 0 (the unscaled JSD) or to anything else.
    assert near_zero == pytest.approx(KL_P_Q, abs=1e-5)
    assert near_one == pytest.approx(KL_Q_P, abs=1e-5)


def test_ce_is_minus_log_p_of_the_target_summed_and_skips_ignored_rows() -> None:
    logits = torch.cat([Q.log(), P.log(), P.log()])  # [3, 3]
    targets = torch.tensor([1, 0, IGNORE_INDEX])
    expected = -math.log(0.5) - math.log(0.5)
    assert token_ce(logits, targets).item() == pytest.approx(expected, abs=1e-12)


def test_kd_loss_applies_tau_squared_and_lambda_and_counts_tokens() -> None:
    temperature, kd_weight = 2.0, 0.5
    student, teacher = logits_at(Q, temperature), logits_at(P, temperature)
    student, teacher = student.repeat(3, 1), teacher.repeat(3, 1)  # [3, 3]
    targets = torch.tensor([0, IGNORE_INDEX, 2])
    parts = kd_loss(student, targets, teacher, temperature=temperature, kd_weight=kd_weight)
    assert parts.kd.item() == pytest.approx(temperature**2 * 2 * KL_P_Q, abs=1e-9)  # 2 counted rows, × τ²
    assert parts.ce.item() == pytest.approx(token_ce(student, targets).item(), abs=1e-12)
    assert parts.total.item() == pytest.approx(parts.ce.item() + kd_weight * parts.kd.item(), abs=1e-12)
    assert parts.n_tokens.item() == 2
    ce_only = kd_loss(student, targets, None, temperature=temperature, kd_weight=kd_weight, ce_weight=2.0)
    assert ce_only.kd.item() == 0.0
    assert ce_only.total.item() == pytest.approx(2 * parts.ce.item(), abs=1e-12)


def test_teacher_gets_no_gradient() -> None:
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    parts = kd_loss(student, torch.tensor([1, 2, 3]), teacher, temperature=2.0, kd_weight=0.5)
    parts.total.backward()
    assert student.grad is not None and teacher.grad is None


def test_masked_teacher_tokens_give_finite_values_and_gradients() -> None:
    # A −inf teacher logit (e.g. a padded vocab entry) must not produce NaN, in any divergence.
    teacher = torch.tensor([[1.0, 0.0, float("-inf")]], dtype=torch.float64)
    for divergence in Divergence:
        student = torch.tensor([[0.5, 0.2, -3.0]], dtype=torch.float64, requires_grad=True)
        value = dense_divergence(student, teacher, 1.0, divergence, 0.5)
        value.backward()
        assert student.grad is not None
        if divergence is Divergence.REVERSE_KL:
            assert math.isinf(value.item())  # student mass where the teacher has none: genuinely infinite
        else:
            assert math.isfinite(value.item()) and torch.isfinite(student.grad).all()


def test_normalise_divides_by_global_tokens_and_undoes_rank_averaging() -> None:
    # Two micro-batches of 3 and 1 tokens: summing normalised parts gives the per-token mean over all 4.
    per_token = torch.tensor([1.0, 2.0, 3.0, 10.0])
    micro_sums = [per_token[:3].sum(), per_token[3:].sum()]
    accumulated = torch.stack([normalise(s, 4) for s in micro_sums]).sum()
    assert accumulated.item() == pytest.approx(per_token.mean().item())
    assert normalise(torch.tensor(6.0), torch.tensor(3), world_size=2).item() == pytest.approx(4.0)
    assert normalise(torch.tensor(0.0), 0).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Sparse top-k
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_kl_with_k_equal_vocab_is_the_dense_forward_kl(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    student = (torch.randn(5, 40, generator=generator) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(5, 40, generator=generator) * 3).to(dtype)
    ids, logprobs = teacher_topk(teacher, 40, temperature=2.0)
    assert ids.dtype == torch.int32 and logprobs.dtype == dtype
    sparse = sparse_forward_kl(student, ids, logprobs, 2.0)
    dense = dense_divergence(student, teacher, 2.0, Divergence.FORWARD_KL)
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    (dense_grad,) = torch.autograd.grad(dense, student)
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-6, rtol=1e-5)


def test_sparse_kl_error_shrinks_monotonically_as_k_grows() -> None:
    generator = torch.Generator().manual_seed(2)
    vocab = 64
    teacher = torch.randn(8, vocab, generator=generator, dtype=torch.float64) * 4  # peaked
    student = torch.randn(8, vocab, generator=generator, dtype=torch.float64) * 4
    dense = dense_divergence(student, teacher, 1.0).item()
    errors = []
    for k in [1, 2, 4, 8, 16, 32, 48, 63, vocab]:
        sparse = sparse_forward_kl(student, *teacher_topk(teacher, k, 1.0), 1.0).item()
        assert sparse <= dense + 1e-12  # the tail bucket makes it a lower bound (data processing)
        errors.append(dense - sparse)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(errors))
    assert errors[0] > 1e-3 and errors[-1] == pytest.approx(0.0, abs=1e-12)


def test_sparse_kl_tail_bucket_matches_hand_formula() -> None:
    # k = 1 on the 3-way example: buckets {0} and {1, 2}: KL = 0.5·ln(0.5/0.2) + 0.5·ln(0.5/0.8).
    ids, logprobs = teacher_topk(P.log(), 1, 1.0)
    assert ids.tolist() == [[0]]
    value = sparse_forward_kl(Q.log(), ids, logprobs, 1.0)
    assert value.item() == pytest.approx(0.5 * math.log(2.5) + 0.5 * math.log(0.625), abs=1e-12)


def test_teacher_topk_logprobs_are_normalised_over_the_full_vocab_at_tau() -> None:
    teacher = torch.randn(3, 20, dtype=torch.float64)
    _, logprobs = teacher_topk(teacher, 5, 2.0)
    expected = F.log_softmax(teacher / 2.0, dim=-1).topk(5, dim=-1).values
    torch.testing.assert_close(logprobs, expected)


# ---------------------------------------------------------------------------------------------------------------
# Chunked == naive, values and gradients
# ---------------------------------------------------------------------------------------------------------------


def naive_kd_total(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher: torch.Tensor | TopKTeacher,
    temperature: float,
    kd_weight: float,
    divergence: Divergence,
    beta: float,
) -> torch.Tensor:
    """The whole objective written out plainly on full [N, V] logits, for autograd to differentiate."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    counted = targets != IGNORE_INDEX
    ce = -F.log_softmax(logits, -1)[counted].gather(-1, targets[counted].unsqueeze(-1)).sum()
    student_logp = F.log_softmax(logits[counted] / temperature, -1)
    if isinstance(teacher, TopKTeacher):
        ids, teacher_logp = teacher.ids[counted].long(), teacher.logprobs[counted]
        kept = (teacher_logp.exp() * (teacher_logp - student_logp.gather(-1, ids))).sum()
        teacher_tail = 1 - teacher_logp.exp().sum(-1)
        student_tail = 1 - student_logp.exp().gather(-1, ids).sum(-1)
        kd = kept + (teacher_tail * (teacher_tail.log() - student_tail.log())).sum()
    else:
        kd = naive_divergence(logits[counted], teacher[counted].double(), temperature, divergence, beta)
    return ce + kd_weight * temperature**2 * kd


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    ("teacher_kind", "divergence"),
    [
        ("dense", Divergence.FORWARD_KL),
        ("dense", Divergence.REVERSE_KL),
        ("dense", Divergence.JSD),
        ("topk", Divergence.FORWARD_KL),
    ],
)
def test_chunked_loss_matches_naive_formula_in_value_and_gradients(
    chunk_size: int, with_bias: bool, teacher_kind: str, divergence: Divergence
) -> None:
    generator = torch.Generator().manual_seed(3)
    n_rows, hidden_size, vocab = 10, 6, 13
    hidden = torch.randn(n_rows, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = (
        torch.randn(vocab, generator=generator, dtype=torch.float64, requires_grad=True)
        if with_bias
        else None
    )
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    targets[4] = IGNORE_INDEX
    teacher_logits = torch.randn(n_rows, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = teacher_topk(teacher_logits, 5, 2.0) if teacher_kind == "topk" else teacher_logits
    params = [hidden, weight] + ([bias] if bias is not None else [])

    parts = chunked_kd_loss(
        hidden, weight, targets, teacher, temperature=2.0, kd_weight=0.5, divergence=divergence,
        jsd_beta=0.3, lm_head_bias=bias, chunk_size=chunk_size,
    )  # fmt: skip
    chunked_grads = torch.autograd.grad(parts.total, params)
    expected = naive_kd_total(hidden, weight, bias, targets, teacher, 2.0, 0.5, divergence, 0.3)
    naive_grads = torch.autograd.grad(expected, params)

    torch.testing.assert_close(parts.total, expected, rtol=1e-10, atol=1e-10)
    for chunked_grad, naive_grad in zip(chunked_grads, naive_grads, strict=True):
        torch.testing.assert_close(chunked_grad, naive_grad, rtol=1e-9, atol=1e-10)
    assert parts.n_tokens.item() == n_rows - 1
    # The unchunked library path agrees too.
    logits = F.linear(hidden, weight, bias)
    plain = kd_loss(
        logits, targets, teacher, temperature=2.0, kd_weight=0.5, divergence=divergence, jsd_beta=0.3
    )
    torch.testing.assert_close(parts.ce, plain.ce)
    torch.testing.assert_close(parts.kd, plain.kd)


def test_chunked_loss_recomputes_each_chunk_in_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # Checkpointing means backward runs each chunk's projection again instead of keeping its [C, V] logits:
    # the chunk function runs once per chunk in forward and once more per chunk in backward.
    n_rows, hidden_size, vocab, chunk_size = 50, 8, 200, 16  # 4 chunks, the last one short
    hidden = torch.randn(n_rows, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    teacher = torch.randn(n_rows, vocab).half()
    targets = torch.randint(0, vocab, (n_rows,))
    chunk_rows: list[int] = []
    chunk_function = losses._chunk_loss_sums

    def counting_chunk_function(
        student_hidden: torch.Tensor, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        chunk_rows.append(student_hidden.shape[0])
        return chunk_function(student_hidden, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(losses, "_chunk_loss_sums", counting_chunk_function)
    parts = chunked_kd_loss(
        hidden, weight, targets, teacher, temperature=2.0, kd_weight=0.5, chunk_size=chunk_size
    )
    assert chunk_rows == [16, 16, 16, 2]
    parts.total.backward()
    assert sorted(chunk_rows) == sorted([16, 16, 16, 2] * 2)
    assert hidden.grad is not None and weight.grad is not None
    # No graph, no checkpoint: under no_grad each chunk runs once.
    chunk_rows.clear()
    with torch.no_grad():
        no_grad_parts = chunked_kd_loss(
            hidden, weight, targets, teacher, temperature=2.0, kd_weight=0.5, chunk_size=chunk_size
        )
    assert chunk_rows == [16, 16, 16, 2]
    torch.testing.assert_close(no_grad_parts.total, parts.total.detach())
    # fp16 teacher logits are upcast inside: same result as an fp32 teacher.
    upcast = chunked_kd_loss(
        hidden, weight, targets, teacher.float(), temperature=2.0, kd_weight=0.5, chunk_size=chunk_size
    )
    torch.testing.assert_close(parts.total, upcast.total)


def test_chunked_loss_on_zero_rows_is_a_zero_wired_to_the_weights() -> None:
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    parts = chunked_kd_loss(
        hidden, weight, torch.zeros(0, dtype=torch.long), torch.zeros(0, 9), temperature=2.0, kd_weight=0.5
    )
    parts.total.backward()
    assert parts.total.item() == 0.0 and parts.n_tokens.item() == 0
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


# ---------------------------------------------------------------------------------------------------------------
# Channel alignment
# ---------------------------------------------------------------------------------------------------------------


def build_batch(prompt_lengths: list[int], response_lengths: list[int], total_length: int) -> torch.Tensor:
    """Right-padded token mask [B, T]: `prompt` positions, then `response` positions marked True, then padding."""
    mask = torch.zeros(len(prompt_lengths), total_length, dtype=torch.bool)
    for example, (prompt, response) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        mask[example, prompt : prompt + response] = True
    return mask


def test_text_and_audio_prompts_of_different_lengths_gather_aligned_rows() -> None:
    response_lengths = [3, 4]
    teacher_tokens = build_batch([5, 5], response_lengths, total_length=12)  # text prompt: 5 tokens
    student_tokens = build_batch([17, 17], response_lengths, total_length=24)  # audio prompt: 17 frames
    check_aligned(student_tokens, teacher_tokens)
    # Each position holds (example, response index) where it predicts a response token, so the gathered rows
    # must agree row for row although the absolute positions differ by 12.
    features = 2
    teacher_values = torch.full((2, 12, features), -1.0)
    student_values = torch.full((2, 24, features), -1.0)
    teacher_prediction = shift_for_prediction(teacher_tokens)
    student_prediction = shift_for_prediction(student_tokens)
    for example, length in enumerate(response_lengths):
        for index in range(length):
            teacher_values[example, 4 + index] = torch.tensor([example, index])
            student_values[example, 16 + index] = torch.tensor([example, index])
    teacher_rows = gather_response_rows(teacher_values, teacher_prediction)
    student_rows = gather_response_rows(student_values, student_prediction)
    assert teacher_rows.shape == student_rows.shape == (sum(response_lengths), features)
    torch.testing.assert_close(teacher_rows, student_rows)
    assert (teacher_rows >= 0).all()  # every gathered row is a prediction position, none a prompt or padding


def test_prediction_rows_line_up_with_target_tokens() -> None:
    # Logits that put all mass on the true next token must give CE ≈ 0 when gathered with the prediction mask
    # and scored against the targets gathered with the token mask.
    input_ids = torch.tensor([[7, 8, 9, 3, 4, 0], [7, 9, 5, 6, 2, 1]])
    token_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    vocab = 10
    logits = torch.full((2, 6, vocab), -30.0)
    logits[:, :-1].scatter_(-1, input_ids[:, 1:].unsqueeze(-1), 30.0)  # position t predicts token t + 1
    rows = gather_response_rows(logits, shift_for_prediction(token_mask))
    targets = gather_response_rows(input_ids, token_mask)
    assert targets.tolist() == [3, 4, 5, 6, 2, 1]
    assert token_ce(rows, targets).item() < 1e-10


def test_check_aligned_names_the_mismatched_example() -> None:
    teacher = build_batch([5, 5, 5], [3, 4, 2], total_length=12)
    student = build_batch([17, 17, 17], [3, 5, 2], total_length=24)
    with pytest.raises(UserError, match=r"example 1 .*5 student.*4 teacher"):
        check_aligned(student, teacher)
    with pytest.raises(UserError, match=r"example 1 \(id orca-42\)"):
        check_aligned(student, teacher, example_ids=["orca-41", "orca-42", "orca-43"])


def test_response_token_at_position_zero_is_rejected() -> None:
    with pytest.raises(UserError, match="example 1 has a response token at position 0"):
        shift_for_prediction(torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

ROWS = torch.randn(4, 9)
TARGETS = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, "temperature: must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature:"),
        ({"temperature": float("nan")}, "temperature:"),
        ({"kd_weight": -0.1}, "kd_weight: must be a finite number >= 0"),
        ({"ce_weight": -1.0}, "ce_weight:"),
        ({"jsd_beta": 1.5}, r"jsd_beta: must lie in \[0, 1\]"),
        ({"jsd_beta": -0.1}, "jsd_beta:"),
        ({"divergence": "kl"}, "divergence: unknown value 'kl'"),
    ],
)
def test_invalid_settings_raise_user_error_naming_the_field(
    overrides: dict[str, object], message: str
) -> None:
    settings: dict[str, object] = {
        "temperature": 2.0,
        "kd_weight": 0.5,
        "divergence": Divergence.JSD,
        "jsd_beta": 0.5,
    }
    settings.update(overrides)
    with pytest.raises(UserError, match=message):
        kd_loss(ROWS, TARGETS, ROWS.clone(), **settings)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=message):
        chunked_kd_loss(torch.randn(4, 3), torch.randn(9, 3), TARGETS, ROWS.clone(), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, 10])
def test_invalid_k_raises_user_error(k: int) -> None:
    with pytest.raises(UserError, match=r"k: must lie in \[1, 9\]"):
        teacher_topk(ROWS, k, 2.0)


def test_teacher_that_does_not_match_the_student_raises_user_error() -> None:
    with pytest.raises(UserError, match="teacher_logits: vocab size 10 differs from the student's 9"):
        kd_loss(ROWS, TARGETS, torch.randn(4, 10), temperature=2.0, kd_weight=0.5)
    with pytest.raises(UserError, match="teacher_logits: 3 teacher response rows but 4 student rows"):
        kd_loss(ROWS, TARGETS, torch.randn(3, 9), temperature=2.0, kd_weight=0.5)
    with pytest.raises(UserError, match="lm_head|teacher_logits: vocab size"):
        chunked_kd_loss(
            torch.randn(4, 3), torch.randn(9, 3), TARGETS, torch.randn(4, 10), temperature=2.0, kd_weight=0.5
        )
    topk = teacher_topk(ROWS, 3, 2.0)
    with pytest.raises(UserError, match="divergence: jsd needs dense teacher logits"):
        kd_loss(ROWS, TARGETS, topk, temperature=2.0, kd_weight=0.5, divergence=Divergence.JSD)
    with pytest.raises(UserError, match=r"topk_ids: ids must lie in \[0, 9\)"):
        sparse_forward_kl(ROWS, topk.ids + 9, topk.logprobs, 2.0)
    with pytest.raises(UserError, match="topk_logprobs: probabilities sum to"):
        sparse_forward_kl(ROWS, topk.ids, ROWS.topk(3).values, 2.0)  # raw logits, not log-probs


def test_chunked_loss_accepts_bf16_weights_and_returns_fp32_sums() -> None:
    # A bf16 model: the projection runs in bf16 like the model's own lm_head, the softmax maths in fp32.
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 8, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(30, 8, generator=generator).bfloat16().requires_grad_()
    teacher = torch.randn(9, 30, generator=generator).bfloat16()
    targets = torch.randint(0, 30, (9,), generator=generator)
    parts = chunked_kd_loss(hidden, weight, targets, teacher, temperature=2.0, kd_weight=0.5, chunk_size=4)
    assert parts.total.dtype == torch.float32
    parts.total.backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    reference = kd_loss(F.linear(hidden, weight).float(), targets, teacher, temperature=2.0, kd_weight=0.5)
    torch.testing.assert_close(parts.total, reference.total)
