"""The composable student: Whisper encoder -> projector -> any transformers causal LM, inside the LM's chat template.

A spoken prompt is laid out exactly like the text prompt it stands for: the chat template is rendered with a
placeholder for the user's words, the rendered string is split around it, and the audio embeddings go where the
words would be (prefix ids | audio embeddings | suffix ids | response ids + end-of-turn). Text prompts take the same
path (embedding lookup of the template ids the teacher reads), so a text-mode student IS the plain LM on those ids:
T→T with a frozen LM reproduces the teacher exactly when they are the same model.

With `ProjectorKind.POSTERIOR` the projector slot holds a `PosteriorConnector` instead: the audio is decoded by
Whisper's frozen decoder (or its posteriors come cached, packed in `Prompt.features`) and each decoded Whisper
token becomes one LM position (see `cmkd.models.posterior_connector`).

The LM trains not at all (`frozen`), through peft LoRA adapters (`lora`), or fully (`full`). Checkpoints hold only
trainable tensors; the frozen parts are named by source in a JSON beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cmkd.config import to_dict
from cmkd.errors import UserError
from cmkd.models.checkpoint import load_trainable, save_trainable
from cmkd.models.encoder import WhisperSpeechEncoder, pad_frames
from cmkd.models.posterior import PosteriorFeatures, audio_digest, posterior_features
from cmkd.models.posterior_connector import PosteriorConnector
from cmkd.models.projector import Projector
from cmkd.models.speech_lm import ChatFormat, LMOutput, Prompt, check_batch, pad_sequences, prediction_layout
from cmkd.stage_configs import LMMode, LoraSettings, StudentSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_AUDIO_SLOT = -1
"""Stand-in id for an audio position while a batch of ids is assembled; replaced before the embedding lookup."""
_POSTERIOR_MEMO: dict[tuple[str, ...], PosteriorFeatures] = {}
"""Decoded Whisper posteriors of clips seen in this process (training epochs, eval modes, several students);
the decoder is frozen and greedy, so they never change. Bounded; a few hundred short clips take a few MB."""
_POSTERIOR_MEMO_SIZE = 20_000
_SETTINGS_THAT_SHAPE_WEIGHTS = ("kind", "lm_mode", "encoder_trainable", "projector", "lora")


def prepare_lm(lm: PreTrainedModel, mode: LMMode, lora: LoraSettings) -> nn.Module:
    """Set what of the LM trains. LoRA wraps it with peft (which injects adapters IN PLACE into `lm`)."""
    if mode is LMMode.FROZEN:
        return lm.requires_grad_(False).eval()
    if mode is LMMode.FULL:
        return lm.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(lm, config)
    except ValueError as error:
        raise UserError(f"student.lora.target_modules: {error}") from error


class ComposableSpeechLM(nn.Module):
    """Encoder + projector + causal LM implementing `cmkd.models.speech_lm.SpeechLM`."""

    def __init__(
        self,
        encoder: WhisperSpeechEncoder,
        projector: Projector | PosteriorConnector,
        lm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        settings: StudentSettings,
        sources: dict[str, str],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.settings = settings
        self.lm_mode = LMMode(settings.lm_mode)
        self.sources = sources
        self.chat = ChatFormat(tokenizer)

    # -- parts --------------------------------------------------------------------------------------------------

    def _causal_lm(self) -> Any:
        """The transformers model itself (inside the peft wrapper when LoRA is on; adapters are in its layers)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def _embeddings(self) -> nn.Embedding:
        return self._causal_lm().get_input_embeddings()

    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] output projection, for losses that turn hidden states into logits chunk by chunk."""
        causal_lm = self._causal_lm()
        head = causal_lm.get_output_embeddings()
        has_bias = getattr(head, "bias", None) is not None
        if has_bias or getattr(causal_lm.config, "final_logit_softcapping", None):
            raise UserError(
                f"student.lm: {type(causal_lm).__name__} computes logits with a bias or soft-capping, so they are "
                "not hidden @ W^T; use the non-chunked loss path"
            )
        return head.weight

    def train(self, mode: bool = True) -> ComposableSpeechLM:
        """Frozen parts stay in eval mode (no dropout on what does not learn)."""
        super().train(mode)
        self.encoder.train(mode)
        if self.lm_mode is LMMode.FROZEN:
            self.lm.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, param) for name, param in self.named_parameters() if param.requires_grad]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (projector / lora / lm / encoder), each with its own learning rate."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in self.trainable_parameters():
            if name.startswith("projector."):
                group = "projector"
            elif name.startswith("encoder."):
                group = "encoder"
            elif "lora_" in name:
                group = "lora"
            else:
                group = "lm"
            groups.setdefault(group, []).append(param)
        return groups

    # -- batches ------------------------------------------------------------------------------------------------

    def _speech_rows(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor | None, list[int]]:
        """Audio embeddings of every spoken prompt, concatenated in batch order: [N_audio, H], and N per prompt."""
        spoken = [prompt for prompt in prompts if not prompt.is_text]
        if not spoken:
            return None, []
        if isinstance(self.projector, PosteriorConnector):
            embeds, embed_mask = self._posterior_embeddings(spoken, self.projector)  # B_s, N, H; B_s, N
        else:
            embeds, embed_mask = self._frame_embeddings(spoken, self.projector)  # B_s, T/k, H; B_s, T/k
        return embeds[embed_mask], embed_mask.sum(dim=1).tolist()  # N_audio, H

    def _frame_embeddings(
        self, spoken: Sequence[Prompt], projector: Projector
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames (computed, or cached in `features`) through a frame projector: [B_s, T/k, H], [B_s, T/k]."""
        device = projector.linear_out.weight.device
        frames_by_index: dict[int, torch.Tensor] = {}
        with_audio = [index for index, prompt in enumerate(spoken) if prompt.audio is not None]
        if with_audio:
            frames, frame_mask = self.encoder(
                [spoken[index].audio for index in with_audio]
            )  # B_a, T, D; B_a, T
            for row, index in enumerate(with_audio):
                frames_by_index[index] = frames[row, frame_mask[row]]  # T_b, D
        for index, prompt in enumerate(spoken):
            cached = prompt.features
            if cached is not None:
                if cached.shape[1] != self.encoder.hidden_size:
                    raise UserError(
                        f"prompt.features: width {cached.shape[1]} but the encoder's is {self.encoder.hidden_size}; "
                        "the feature cache was made with another encoder"
                    )
                frames_by_index[index] = cached.to(device=device, dtype=torch.float32)  # T_b, D
        frames, frame_mask = pad_frames([frames_by_index[index] for index in range(len(spoken))])  # B_s, T, D
        return projector(frames, frame_mask)  # B_s, T/k, H and B_s, T/k

    def _posterior_embeddings(
        self, spoken: Sequence[Prompt], connector: PosteriorConnector
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper posteriors (decoded now, or cached packed in `features`) through the connector: [B_s, N, H]."""
        decoded: dict[int, PosteriorFeatures] = {}
        with_audio = [index for index, prompt in enumerate(spoken) if prompt.audio is not None]
        keys = {index: self._posterior_key(spoken[index].audio, connector) for index in with_audio}
        decoded.update(
            {
                index: _POSTERIOR_MEMO[key]
                for index, key in keys.items()
                if key is not None and key in _POSTERIOR_MEMO
            }
        )
        to_decode = [index for index in with_audio if index not in decoded]
        if to_decode:
            clips = [spoken[index].audio for index in to_decode]
            posteriors = posterior_features(clips, self.encoder, connector.decoder, batch_size=len(clips))
            for index, features in zip(to_decode, posteriors, strict=True):
                decoded[index] = features
                key = keys[index]
                if key is not None and len(_POSTERIOR_MEMO) < _POSTERIOR_MEMO_SIZE:
                    _POSTERIOR_MEMO[key] = features
        for index, prompt in enumerate(spoken):
            cached = prompt.features
            if cached is not None:
                if cached.shape[1] != connector.input_width:
                    raise UserError(
                        f"prompt.features: width {cached.shape[1]} but the posterior connector reads "
                        f"{connector.input_width} (2 x top-k {connector.top_k} + decoder width); the posterior "
                        "cache was made with other settings, or these are encoder frames"
                    )
                decoded[index] = PosteriorFeatures.from_packed(cached, connector.top_k)
        return connector([decoded[index] for index in range(len(spoken))])  # B_s, N, H and B_s, N

    def _posterior_key(self, audio: Any, connector: PosteriorConnector) -> tuple[str, ...] | None:
        """Whisper is frozen, so a clip's posteriors depend only on the clip, the weights and the decode settings.

        None (no memo) when the weights have no stable name (built in memory: object ids are reused after garbage
        collection) or when the encoder trains."""
        source = self.sources.get("encoder", "")
        if self.settings.encoder_trainable or not source or source.startswith("<"):
            return None
        return (source, repr(self.settings.projector), audio_digest(audio))

    def _assemble(
        self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]] | None, left_pad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Prompt (+ response + end-of-turn) rows -> inputs_embeds [B, T, H], attention_mask [B, T], prompt lengths."""
        embeddings = self._embeddings()
        speech_rows, speech_counts = self._speech_rows(prompts)
        counts = iter(speech_counts)
        sequences: list[list[int]] = []
        prompt_lengths: list[int] = []
        for row, prompt in enumerate(prompts):
            if prompt.text is not None:
                ids = self.chat.prompt_ids(prompt.system, prompt.text)
            else:
                prefix, suffix = self.chat.split_prompt_ids(prompt.system)
                ids = [*prefix, *[_AUDIO_SLOT] * next(counts), *suffix]
            prompt_lengths.append(len(ids))
            if responses is not None:
                ids = [*ids, *responses[row], self.chat.end_of_turn_id]
            sequences.append(ids)

        device = embeddings.weight.device
        input_ids, attention_mask = pad_sequences(sequences, self.chat.pad_id, left_pad)  # B, T and B, T
        audio_slots = input_ids == _AUDIO_SLOT  # B, T
        input_ids = input_ids.masked_fill(audio_slots, self.chat.pad_id).to(device)
        inputs_embeds = embeddings(input_ids)  # B, T -> B, T, H
        if speech_rows is not None:
            # Fills the slots row-major (example by example, positions ascending): the order of speech_rows.
            slots = audio_slots.to(device).unsqueeze(-1)  # B, T, 1
            audio_embeds = speech_rows.to(inputs_embeds.dtype)  # N_audio, H
            inputs_embeds = inputs_embeds.masked_scatter(slots, audio_embeds)  # B, T, H
        return inputs_embeds, attention_mask.to(device), prompt_lengths

    def forward(
        self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]], return_hidden: bool = False
    ) -> LMOutput:
        """Teacher-forced pass over prompt + response + end-of-turn (right padding); see `LMOutput`."""
        check_batch(prompts, responses, self._embeddings().num_embeddings)
        inputs_embeds, attention_mask, prompt_lengths = self._assemble(prompts, responses, left_pad=False)
        batch_len = inputs_embeds.shape[1]
        prediction_mask, targets = prediction_layout(
            prompt_lengths, responses, self.chat.end_of_turn_id, batch_len
        )
        prediction_mask, targets = prediction_mask.to(inputs_embeds.device), targets.to(inputs_embeds.device)
        if return_hidden:
            decoder = self._causal_lm().get_decoder()
            hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
            return LMOutput(None, hidden.last_hidden_state, prediction_mask, targets)  # hidden: B, T, H
        output = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return LMOutput(output.logits, None, prediction_mask, targets)  # logits: B, T, V

    def generate_ids(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[list[int]]:
        """Answer token ids per prompt (without the end-of-turn), batched with left padding and a KV cache."""
        check_batch(prompts, None)
        config = self.chat.generation_config(max_new_tokens, do_sample, temperature)
        with _eval_mode(self), torch.inference_mode():
            inputs_embeds, attention_mask, _ = self._assemble(prompts, None, left_pad=True)
            # With inputs_embeds and no input_ids, transformers returns only the new tokens: B, T_new.
            new_tokens = self.lm.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=config
            )
        return [self.chat.trim_generated(row.tolist()) for row in new_tokens]

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[str]:
        """Answer text per prompt; text, audio and cached-feature prompts may be mixed in one batch."""
        return self.chat.decode_answers(self.generate_ids(prompts, max_new_tokens, do_sample, temperature))

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        """Write only the trainable tensors (safetensors) plus a JSON naming the frozen parts and the settings."""
        return save_trainable(
            directory,
            self.trainable_parameters(),
            kind="composable",
            frozen_parts=dict(self.sources),
            settings=to_dict(self.settings),
        )

    def load(self, directory: Path) -> None:
        """Load trainable tensors saved by `save`, strictly: every key and shape must match this student."""
        current = to_dict(self.settings)
        meta = load_trainable(
            directory,
            self.trainable_parameters(),
            kind="composable",
            hint=lambda saved: _settings_difference(saved.get("settings", {}), current),
        )
        if meta.get("frozen_parts") != self.sources:
            logger.warning("checkpoint %s was trained on frozen parts %s; loading into %s", directory,
                           meta.get("frozen_parts"), self.sources)  # fmt: skip


def _settings_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """'; it was saved with projector.stack=8 (this student: 4)' for the first weight-shaping setting that differs."""
    for key in _SETTINGS_THAT_SHAPE_WEIGHTS:
        saved_value, current_value = saved.get(key), current.get(key)
        if isinstance(saved_value, dict) and isinstance(current_value, dict):
            for sub_key in sorted(saved_value.keys() | current_value.keys()):
                if saved_value.get(sub_key) != current_value.get(sub_key):
                    return (
                        f"; it was saved with student.{key}.{sub_key}={saved_value.get(sub_key)} "
                        f"(this student: {current_value.get(sub_key)})"
                    )
        elif saved_value != current_value:
            return f"; it was saved with student.{key}={saved_value} (this student: {current_value})"
    return ""


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (generation must not apply dropout), then the caller's mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
