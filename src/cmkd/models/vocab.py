"""Can the teacher's distribution be compared with the student's, token for token?

KL(p_T ‖ p_S) needs both to be distributions over the SAME tokens in the same order: identical tokenizers. Model
output layers are often padded past the tokenizer's real vocabulary (Qwen2.5: 151,665 tokens, 151,936 or 152,064
rows by size), and those extra rows are never a real token, so two models that differ only there are compared on
the rows they share. Anything else cannot be fixed by slicing: the run must drop the KL term (CE on ŷ still works,
after re-tokenizing ŷ's text with the student tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmkd.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class VocabPlan:
    """How to line up teacher and student logits.

    `shared_vocab`: the tokenizers map text to the same ids (teacher ŷ ids are valid student targets as they are).
    `slice_to`: compare logits[..., :slice_to] of both models (only padding rows are dropped); 0 when not shared.
    """

    slice_to: int
    shared_vocab: bool = True


def same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    """Same token -> id mapping, added/special tokens included."""
    return len(first) == len(second) and first.get_vocab() == second.get_vocab()


def check_vocab(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_vocab_size: int,
    student_vocab_size: int,
    need_shared_vocab: bool,
) -> VocabPlan:
    """Plan the logit comparison; UserError when KL is asked for (`need_shared_vocab`) and cannot be done."""
    if not same_tokenizer(teacher_tokenizer, student_tokenizer):
        if need_shared_vocab:
            raise UserError(
                f"teacher.model / student.lm: the tokenizers differ ({len(teacher_tokenizer)} vs "
                f"{len(student_tokenizer)} tokens, different mappings); the KL term needs a shared vocabulary. "
                "Use a teacher from the student's model family, or set loss.kd_weight=0 to distil with CE on the "
                "teacher's responses only"
            )
        return VocabPlan(slice_to=0, shared_vocab=False)
    real_size = len(student_tokenizer)
    for name, size in (("teacher.model", teacher_vocab_size), ("student.lm", student_vocab_size)):
        if size < real_size:
            raise UserError(
                f"{name}: its output layer has {size} rows but the tokenizer has {real_size} tokens; "
                "the model and tokenizer do not belong together"
            )
    # Both sizes are >= the real vocabulary, so every row past the smaller one is padding in the larger model.
    return VocabPlan(slice_to=min(teacher_vocab_size, student_vocab_size), shared_vocab=True)
