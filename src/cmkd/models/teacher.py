"""The frozen text teacher: reads the TEXT query and scores (or writes) the response ŷ both channels train on.

Its `forward` keeps the student's contract (`LMOutput`, len(ŷ)+1 prediction positions per example) so teacher and
student rows line up by mask. It runs under `torch.no_grad`, not `inference_mode`: the KD loss combines teacher
logits with student tensors that autograd records, and inference tensors cannot be saved for backward.

Isolation (a student LoRA or fine-tune must never change the teacher pass): the teacher holds its OWN model
object and never shares modules with a student that trains the LM. `cmkd.models.build.build_student` deep-copies a
passed-in LM before adding LoRA adapters or unfreezing it (peft injects adapters in place, so sharing one object
would route the teacher through them), and `build_teacher` loads its own copy from the checkpoint. Sharing one
object with a FROZEN-LM student is safe (neither writes to it) and saves the memory of a second copy. The
constructor refuses a model that already carries peft adapters. Cost: a LoRA student on the teacher's own backbone
keeps two copies of the base weights; disabling adapters per pass would save that memory but couples the teacher to
the student's training state, which is the failure mode this guards against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cmkd.errors import UserError
from cmkd.models.speech_lm import ChatFormat, LMOutput, Prompt, check_batch, pad_sequences, prediction_layout
from cmkd.stage_configs import DType

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


class TextTeacher:
    """A frozen causal LM in eval mode, optionally in lower precision, that only ever reads text prompts.

    Takes ownership of `model`: freezes it and casts it to `dtype` in place (see the module doc on sharing)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        dtype: DType | torch.dtype = DType.FLOAT32,
    ) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
            raise UserError(
                "teacher.model: the model carries peft adapters (it is a student's LM); give the teacher its own copy"
            )
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else TORCH_DTYPES[DType(dtype)]
        self.model: Any = model.requires_grad_(False).eval().to(torch_dtype)
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)

    def to(self, device: torch.device | str) -> TextTeacher:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (may exceed len(tokenizer) by padding rows; see cmkd.models.vocab)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def _text_prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        ids: list[list[int]] = []
        for prompt in prompts:
            if prompt.text is None:
                raise UserError("teacher: reads text prompts only (the method's teacher never hears audio)")
            ids.append(self.chat.prompt_ids(prompt.system, prompt.text))
        return ids

    @torch.no_grad()
    def forward(
        self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]], return_hidden: bool = False
    ) -> LMOutput:
        """Teacher-forced pass over text prompt + ŷ + end-of-turn, right-padded; logits in the teacher's dtype."""
        check_batch(prompts, responses, self.model.get_input_embeddings().num_embeddings)
        prompt_ids = self._text_prompt_ids(prompts)
        sequences = [
            [*ids, *response, self.chat.end_of_turn_id]
            for ids, response in zip(prompt_ids, responses, strict=True)
        ]
        # B, T ids and attention mask, right-padded so every target keeps its position.
        input_ids, attention_mask = pad_sequences(sequences, self.chat.pad_id, left_pad=False)
        prompt_lengths = [len(ids) for ids in prompt_ids]
        batch_len = input_ids.shape[1]
        prediction_mask, targets = prediction_layout(
            prompt_lengths, responses, self.chat.end_of_turn_id, batch_len
        )
        device = self.device
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        mask, targets = prediction_mask.to(device), targets.to(device)
        if return_hidden:
            hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # B, T, H
            return LMOutput(None, hidden, mask, targets)
        return LMOutput(self.model(**inputs, use_cache=False).logits, None, mask, targets)  # B, T, V

    __call__ = forward

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[list[int]]:
        """ŷ token ids per prompt (without the end-of-turn), batched with left padding and a KV cache."""
        check_batch(prompts, None)
        input_ids, attention_mask = pad_sequences(
            self._text_prompt_ids(prompts), self.chat.pad_id, left_pad=True
        )
        config = self.chat.generation_config(max_new_tokens, do_sample, temperature)
        # B, T + T_new: the left-padded prompt, then the new tokens.
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
        )
        prompt_len = input_ids.shape[1]
        return [self.chat.trim_generated(row[prompt_len:].tolist()) for row in sequences]

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[str]:
        return self.chat.decode_answers(self.generate_ids(prompts, max_new_tokens, do_sample, temperature))
