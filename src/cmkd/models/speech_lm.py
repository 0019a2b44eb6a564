"""The contract every student (and the text teacher) speaks: prompts and responses in, aligned outputs back.

Both distillation channels train on the SAME response tokens ŷ after prompts of different lengths (text tokens
for T→T and the teacher, audio embeddings for S→T). So nothing downstream may index by absolute position: every
forward returns a `prediction_mask` marking the positions whose output predicts a response token, and exactly
len(response) + 1 positions per example are marked (the response and the end-of-turn token the model must learn
to emit). Losses gather rows with that mask (`cmkd.losses.gather_response_rows`) and the rows of a text pass, a
speech pass and the teacher pass line up one to one.

A prompt is always framed by the model's own chat template (`ChatFormat`), so the teacher, a text-mode student and
the prepare stage build byte-identical token ids for the same question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from cmkd.errors import UserError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Target of a position that predicts nothing (same value `F.cross_entropy` ignores)."""

SAMPLE_RATE = 16_000
"""Every audio prompt is 16 kHz mono float32; the data layer resamples before it gets here."""

AUDIO_PLACEHOLDER = "<<cmkd-audio-slot-5f0c>>"
"""Stands in for the user's words when the chat template is rendered for a spoken prompt; the audio embeddings go
exactly where it was. Plain ASCII without spaces so no template's trim/escape filter can alter it."""


@dataclass(eq=False)
class Prompt:
    """One user turn: exactly one of `text`, `audio` (16 kHz mono float32 [S]) or `features` (cached encoder
    output [T_enc, D_enc] of that audio), plus an optional system prompt (None: the template's default)."""

    system: str | None = None
    text: str | None = None
    audio: np.ndarray | None = None
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("text", "audio", "features") if getattr(self, name) is not None]
        if len(given) != 1:
            raise UserError(
                f"prompt: exactly one of text, audio, features must be set (got {given or 'none'})"
            )
        if self.audio is not None and (self.audio.ndim != 1 or self.audio.dtype != np.float32):
            raise UserError(
                f"prompt.audio: expected a 1-D float32 array of 16 kHz mono samples, got "
                f"{self.audio.dtype} {tuple(self.audio.shape)}"
            )
        if self.features is not None and self.features.dim() != 2:
            raise UserError(
                f"prompt.features: expected cached encoder output [T_enc, D], got {tuple(self.features.shape)}"
            )

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass
class LMOutput:
    """A teacher-forced pass over prompt + response + end-of-turn, right-padded.

    `logits` [B, T, V] or, with `return_hidden=True`, `hidden` [B, T, H] (final-norm hidden states; project them
    with `lm_head_weight()` chunk by chunk). `prediction_mask[b, t]` is True where position t predicts a response
    token, `targets[b, t]` is that token (IGNORE_INDEX elsewhere).
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    prediction_mask: torch.Tensor
    targets: torch.Tensor


@runtime_checkable
class SpeechLM(Protocol):
    """What the training loop, the prepare stage and the evaluator need from any student.

    Implementations are `nn.Module`s (so `.to()`, `.train()`, `.eval()` work); frozen parts stay in eval mode.
    """

    tokenizer: PreTrainedTokenizerBase

    def forward(
        self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]], return_hidden: bool = False
    ) -> LMOutput: ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[str]: ...

    def generate_ids(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[list[int]]: ...

    def lm_head_weight(self) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]: ...

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def save(self, directory: Path) -> Path: ...

    def load(self, directory: Path) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# Chat framing shared by every model
# ---------------------------------------------------------------------------------------------------------------


def _messages(system: str | None, user_text: str) -> list[dict[str, str]]:
    # Same rule as cmkd.models.loading.chat_prompt_ids: None keeps the template's own default system prompt.
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_text})
    return messages


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(rendered, str):
        raise RuntimeError(f"internal: apply_chat_template(tokenize=False) returned {type(rendered)}")
    return rendered


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class ChatFormat:
    """How one tokenizer's chat template frames a single-turn prompt and ends an answer.

    `end_of_turn_id` is the first token the template writes after an assistant message (`<|im_end|>` for
    ChatML, `<|eot_id|>` for Llama 3), found by rendering a probe answer: it is what the model must learn to emit
    to stop, and what generation stops on.
    """

    tokenizer: PreTrainedTokenizerBase
    end_of_turn_id: int = field(init=False)
    pad_id: int = field(init=False)
    _split_cache: dict[str | None, tuple[list[int], list[int]]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                "tokenizer: it has no chat template; cmkd frames every prompt with it, use a chat model"
            )
        self.end_of_turn_id = self._find_end_of_turn()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.end_of_turn_id

    def _find_end_of_turn(self) -> int:
        probe = [*_messages(None, "Hi"), {"role": "assistant", "content": AUDIO_PLACEHOLDER}]
        rendered = _render(self.tokenizer, probe, add_generation_prompt=False)
        after_answer = rendered.split(AUDIO_PLACEHOLDER, 1)[1] if AUDIO_PLACEHOLDER in rendered else ""
        tail_ids = _encode(self.tokenizer, after_answer)
        if tail_ids:
            return tail_ids[0]
        if self.tokenizer.eos_token_id is None:
            raise UserError(
                "tokenizer: its chat template writes nothing after an answer and it has no eos token"
            )
        return int(self.tokenizer.eos_token_id)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end generation: the end-of-turn and (if different) the tokenizer's eos."""
        eos = self.tokenizer.eos_token_id
        return [self.end_of_turn_id] + ([int(eos)] if eos is not None and eos != self.end_of_turn_id else [])

    def prompt_ids(self, system: str | None, text: str) -> list[int]:
        """Ids of a templated text prompt ending in the assistant header: the exact ids the teacher reads."""
        from cmkd.models.loading import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, text, system)

    def split_prompt_ids(self, system: str | None) -> tuple[list[int], list[int]]:
        """(ids before the user's words, ids after them up to the assistant header) for a spoken prompt.

        The template is rendered with a placeholder for the user text and the STRING is split around it, then each
        side is encoded on its own: splitting token ids instead would depend on how BPE merges the placeholder
        with its neighbours. Cached per system prompt (a dataset usually has one)."""
        if system not in self._split_cache:
            rendered = _render(
                self.tokenizer, _messages(system, AUDIO_PLACEHOLDER), add_generation_prompt=True
            )
            if rendered.count(AUDIO_PLACEHOLDER) != 1:
                raise UserError(
                    "tokenizer: its chat template does not copy the user message verbatim, so there is no place "
                    "to put the audio; use a model with a plain chat template"
                )
            before, after = rendered.split(AUDIO_PLACEHOLDER)
            self._split_cache[system] = (_encode(self.tokenizer, before), _encode(self.tokenizer, after))
        return self._split_cache[system]

    def generation_config(self, max_new_tokens: int, do_sample: bool, temperature: float) -> GenerationConfig:
        """Explicit decoding settings (the checkpoint's own defaults, e.g. top_p, are not inherited)."""
        from transformers import GenerationConfig

        sampling = {"temperature": temperature} if do_sample else {}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            **sampling,
        )

    def decode_answers(self, answers: Sequence[Sequence[int]]) -> list[str]:
        """Answer texts of trimmed generated ids, special tokens removed: what every `generate` returns."""
        return [text.strip() for text in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]

    def trim_generated(self, token_ids: Sequence[int]) -> list[int]:
        """Generated ids up to (not including) the first stop or pad token."""
        stops = {*self.stop_ids, self.pad_id}
        trimmed: list[int] = []
        for token in token_ids:
            if token in stops:
                break
            trimmed.append(int(token))
        return trimmed


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, left_pad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> (ids [B, T] long, attention_mask [B, T] long), padded on the right (training: targets keep their
    positions) or on the left (generation: every prompt must end where the new tokens start)."""
    seq_len = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)  # B, T
    attention_mask = torch.zeros(len(sequences), seq_len, dtype=torch.long)  # B, T
    for row, ids in enumerate(sequences):
        start = seq_len - len(ids) if left_pad else 0
        input_ids[row, start : start + len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, start : start + len(ids)] = 1
    return input_ids, attention_mask


def prediction_layout(
    prompt_lengths: Sequence[int], responses: Sequence[Sequence[int]], end_of_turn_id: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (prediction_mask [B, T] bool, targets [B, T] long) of right-padded prompt + response + end-of-turn rows.

    Position P-1 (the assistant header's last token) predicts ŷ_0, …, position P-1+len(ŷ) predicts the
    end-of-turn: len(ŷ)+1 marked positions per example, whatever the prompt length P."""
    batch = len(prompt_lengths)
    prediction_mask = torch.zeros(batch, seq_len, dtype=torch.bool)  # B, T
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)  # B, T
    for row, (prompt_len, response) in enumerate(zip(prompt_lengths, responses, strict=True)):
        predicted = [*response, end_of_turn_id]
        start = prompt_len - 1
        prediction_mask[row, start : start + len(predicted)] = True
        targets[row, start : start + len(predicted)] = torch.tensor(predicted, dtype=torch.long)
    return prediction_mask, targets


def check_batch(
    prompts: Sequence[Prompt], responses: Sequence[Sequence[int]] | None, vocab_rows: int | None = None
) -> None:
    """Raise UserError for an empty batch, prompts and responses of different counts, or response ids past the
    model's vocabulary (an index error deep inside the embedding says nothing about which example is wrong)."""
    if not prompts:
        raise UserError("batch: no prompts")
    if responses is None:
        return
    if len(responses) != len(prompts):
        raise UserError(f"batch: {len(prompts)} prompts but {len(responses)} responses")
    if vocab_rows is not None:
        for row, response in enumerate(responses):
            if any(not 0 <= token < vocab_rows for token in response):
                raise UserError(f"response {row}: token ids outside the model's vocabulary [0, {vocab_rows})")
