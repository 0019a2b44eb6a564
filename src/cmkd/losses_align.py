"""Channel alignment: the response rows both channels score, in the same order, after prompts of different lengths.

Why this module exists: the student reads a text or a speech prompt and the teacher a text prompt, so the response
ŷ sits at different positions in the two batches. Every loss works on rows gathered by these helpers, which
training, evaluation and the benchmarks share; they hold no loss maths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmkd.errors import UserError


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
