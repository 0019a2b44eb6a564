"""The teacher's side of the KD term: one pass (or one cache read) per example, shared by both channels.

Rows are the teacher's distributions at the prediction positions of ŷ and the end of turn, example by example:
exactly the order `losses.gather_response_rows` gives the student's rows, whatever the student's prompt was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cmkd.data.logit_cache import LogitCacheReader
from cmkd.errors import UserError
from cmkd.losses import TeacherRows, TopKTeacher, gather_response_rows
from cmkd.models.teacher import TextTeacher
from cmkd.train.examples import TrainExample


@dataclass
class TeacherPassCounter:
    """How many examples the teacher ran on: the benchmark checks it is once per example, not once per channel."""

    examples: int = 0
    batches: int = 0


class OnlineTeacherRows:
    """Runs the frozen teacher on the text prompts; projects only the response rows to logits (no [B, T, V])."""

    def __init__(self, teacher: TextTeacher, vocab_rows: int) -> None:
        self.teacher = teacher
        self.vocab_rows = vocab_rows
        self.counter = TeacherPassCounter()

    @torch.no_grad()
    def __call__(self, examples: Sequence[TrainExample]) -> tuple[TeacherRows, torch.Tensor]:
        prompts = [example.text_prompt() for example in examples]
        responses = [list(example.response_ids) for example in examples]
        output = self.teacher.forward(prompts, responses, return_hidden=True)
        hidden = gather_response_rows(output.hidden, output.prediction_mask)  # N, H
        weight = self.teacher.lm_head_weight()[: self.vocab_rows]  # V, H
        logits = hidden @ weight.T  # N, H -> N, V (teacher dtype; the loss upcasts per chunk)
        self.counter.examples += len(examples)
        self.counter.batches += 1
        return logits, output.prediction_mask


class CachedTeacherRows:
    """Reads the top-k rows the prepare stage cached for each example's ŷ; the teacher model is never loaded."""

    def __init__(self, reader: LogitCacheReader) -> None:
        self.reader = reader
        self.counter = TeacherPassCounter()

    def __call__(self, examples: Sequence[TrainExample]) -> tuple[TeacherRows, None]:
        ids, logprobs = [], []
        for example in examples:
            example_ids, example_logprobs = self.reader.get(example.item_id)  # n + 1, k each
            expected = len(example.response_ids) + 1
            if example_ids.shape[0] != expected:
                raise UserError(
                    f"{example.item_id}/teacher.response_ids: the logit cache holds {example_ids.shape[0]} rows but "
                    f"the response has {expected} positions; the manifest and cache come from different runs"
                )
            ids.append(example_ids)
            logprobs.append(example_logprobs)
        self.counter.examples += len(examples)
        self.counter.batches += 1
        return TopKTeacher(torch.cat(ids), torch.cat(logprobs)), None  # N, k each


def rows_to(teacher_rows: TeacherRows, device: torch.device) -> TeacherRows:
    if isinstance(teacher_rows, TopKTeacher):
        return TopKTeacher(teacher_rows.ids.to(device), teacher_rows.logprobs.to(device))
    return teacher_rows.to(device)
