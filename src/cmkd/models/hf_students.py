"""Real HF speech LLMs as students: Qwen2-Audio and the Qwen2.5-Omni thinker behind the `SpeechLM` contract.

Prompts are framed exactly as the composable student frames them (`ChatFormat`): a text prompt is the teacher's
own template ids, so the text-mode student reads what the teacher reads; a spoken prompt renders the template
with a placeholder for the user's words and puts the model's own audio block there (Qwen2-Audio's
"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\n", Omni's "<|audio_bos|><|AUDIO|><|audio_eos|>"), with
<|AUDIO|> repeated once per audio embedding. That count comes from the model's own audio tower
(`_get_feat_extract_output_lengths` on the feature mask), so it follows transformers, not a copy of its formula.

Why not call the HF processors: `Qwen2_5OmniProcessor` needs a video processor, which needs torchvision, even for
audio-only use; and a processor renders its own template, while the teacher pass and the response masks need the
one `ChatFormat` framing. The processors' audio path is the WhisperFeatureExtractor (16 kHz, padded to 30 s, with
a frame mask) plus that expansion; both are used here directly, and the tests check the ids, features and logits
against the processors' own output.

The transformers model computes everything else from what it is given: audio features are scattered into the
<|AUDIO|> positions, and the Omni thinker derives its mRoPE position ids and `rope_deltas` from `input_ids` and
`attention_mask` (both always passed). LoRA goes into the language model only (the audio and vision towers have
q_proj/v_proj too). Checkpoints hold only trainable tensors (safetensors), like the composable student's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cmkd.config import to_dict
from cmkd.errors import UserError
from cmkd.models.checkpoint import load_trainable, save_trainable
from cmkd.models.speech_lm import (
    SAMPLE_RATE,
    ChatFormat,
    LMOutput,
    Prompt,
    check_batch,
    pad_sequences,
    prediction_layout,
)
from cmkd.stage_configs import LMMode, StudentKind, StudentSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperFeatureExtractor

logger = logging.getLogger(__name__)

AUDIO_ENCODER = "audio encoder"
PROJECTOR = "projector"
LM = "LM"
VISION = "vision encoder (unused)"

PART_PREFIXES: dict[StudentKind, tuple[tuple[str, str], ...]] = {
    StudentKind.QWEN2_AUDIO: (
        ("model.multi_modal_projector.", PROJECTOR),
        ("model.audio_tower.", AUDIO_ENCODER),
        ("model.language_model.", LM),
        ("lm_head.", LM),
    ),
    StudentKind.QWEN2_5_OMNI: (
        # The Omni projector is the last Linear of its audio tower, so it must match before the tower does.
        ("model.audio_tower.proj.", PROJECTOR),
        ("model.audio_tower.", AUDIO_ENCODER),
        ("model.visual.", VISION),
        ("model.language_model.", LM),
        ("lm_head.", LM),
    ),
}
"""Parameter-name prefix -> part, most specific first, for each HF student family (transformers 5 names)."""

FIXED_TABLES = ("embed_positions.weight",)
"""Parameters that stay frozen even in a trainable encoder: Whisper-style fixed sinusoid position tables."""

AUDIO_SLOT_TEXT = {
    StudentKind.QWEN2_AUDIO: "Audio 1: {bos}{audio}{eos}\n",
    StudentKind.QWEN2_5_OMNI: "{bos}{audio}{eos}",
}
"""What each family's own chat template writes for one audio item in a user turn (one <|AUDIO|> before expansion)."""

QWEN_VISION_START_ID = 151652
"""<|vision_bos|> in Qwen's tokenizer (the value transformers' own Omni configs default to)."""
MODEL_TYPES = {StudentKind.QWEN2_AUDIO: "qwen2_audio", StudentKind.QWEN2_5_OMNI: "qwen2_5_omni_thinker"}
MIN_AUDIO_TOKENS = 2
"""Qwen2-Audio treats a lone <|AUDIO|> as an unexpanded legacy prompt, so every clip must give at least two."""


def part_of(kind: StudentKind, parameter_name: str) -> str:
    """Which part (AUDIO_ENCODER, PROJECTOR, LM, VISION) a parameter of an HF student belongs to."""
    for prefix, part in PART_PREFIXES[kind]:
        if parameter_name.startswith(prefix):
            return part
    raise RuntimeError(
        f"internal: parameter '{parameter_name}' of a {kind.value} student belongs to no known part"
    )


def _token_id(tokenizer: PreTrainedTokenizerBase, attribute: str, default: str) -> tuple[str, int]:
    """(token string, id) of an audio special token, by the tokenizer's named attribute or the Qwen default."""
    token = getattr(tokenizer, attribute, None) or default
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise UserError(f"tokenizer: it has no '{token}' token; a Qwen audio model's tokenizer is needed")
    return token, token_id


class HFSpeechLM(nn.Module):
    """A Qwen2-Audio or Qwen2.5-Omni thinker model implementing `cmkd.models.speech_lm.SpeechLM`.

    Takes ownership of `model`: sets what trains and, for LoRA, injects adapters into its language model in place.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        *,
        settings: StudentSettings,
        source: str,
    ) -> None:
        super().__init__()
        self.kind = StudentKind(settings.kind)
        if self.kind not in MODEL_TYPES:
            raise UserError(f"student.kind: {self.kind.value} is not an HF speech-LLM family")
        if model.config.model_type != MODEL_TYPES[self.kind]:
            raise UserError(
                f"student.hf_model: holds a '{model.config.model_type}' model, but student.kind "
                f"{self.kind.value} needs {MODEL_TYPES[self.kind]}"
            )
        mel_bins = model.config.audio_config.num_mel_bins
        if feature_extractor.feature_size != mel_bins:
            raise UserError(
                f"student.hf_model: the feature extractor makes {feature_extractor.feature_size} mel bins but the "
                f"audio encoder expects {mel_bins}"
            )
        self.model: Any = model
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.settings = settings
        self.lm_mode = LMMode(settings.lm_mode)
        self.source = source
        self.chat = ChatFormat(tokenizer)
        audio, self.audio_token_id = _token_id(tokenizer, "audio_token", "<|AUDIO|>")
        bos, bos_id = _token_id(tokenizer, "audio_bos_token", "<|audio_bos|>")
        eos, eos_id = _token_id(tokenizer, "audio_eos_token", "<|audio_eos|>")
        if self.audio_token_id != model.config.audio_token_id:
            raise UserError(
                f"student.hf_model: the tokenizer's {audio} is id {self.audio_token_id} but the model expects "
                f"{model.config.audio_token_id}"
            )
        self._audio_ids = {self.audio_token_id, bos_id, eos_id}
        if self.kind is StudentKind.QWEN2_5_OMNI and not hasattr(model.config, "vision_start_token_id"):
            # transformers 5.23's thinker reads config.vision_start_token_id in get_rope_index for EVERY input, but
            # Qwen2_5OmniThinkerConfig does not declare it (released config.json files carry it). It only matters
            # for image/video prompts, which cmkd never sends; Qwen's id when the tokenizer has no <|vision_bos|>.
            vision_bos = tokenizer.convert_tokens_to_ids(
                getattr(tokenizer, "vision_bos_token", "<|vision_bos|>")
            )
            usable = isinstance(vision_bos, int) and vision_bos != tokenizer.unk_token_id
            model.config.vision_start_token_id = vision_bos if usable else QWEN_VISION_START_ID
        # The slot text split around its single <|AUDIO|>: each side encoded on its own, like ChatFormat's split.
        slot = AUDIO_SLOT_TEXT[self.kind].format(bos=bos, audio=audio, eos=eos)
        before, after = slot.split(audio)
        self._slot_ids = (self._encode(before), self._encode(after))
        self._set_trainable(settings)

    # -- parts --------------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _set_trainable(self, settings: StudentSettings) -> None:
        """Projector always trains; the encoder if asked (minus fixed tables); the LM per `lm_mode`; vision never."""
        self.model.requires_grad_(False)
        if self.lm_mode is LMMode.LORA:
            from peft import LoraConfig, inject_adapter_in_model

            lora = settings.lora
            config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                target_modules=list(lora.target_modules))  # fmt: skip
            try:
                inject_adapter_in_model(config, self.model.model.language_model)
            except ValueError as error:
                raise UserError(f"student.lora.target_modules: {error}") from error
        for name, param in self.model.named_parameters():
            part = part_of(self.kind, name)
            param.requires_grad_(
                part == PROJECTOR
                or (part == AUDIO_ENCODER and settings.encoder_trainable and not name.endswith(FIXED_TABLES))
                or (part == LM and (self.lm_mode is LMMode.FULL or "lora_" in name))
            )
        self.train(self.training)

    def train(self, mode: bool = True) -> HFSpeechLM:
        """Frozen parts stay in eval mode (no dropout on what does not learn)."""
        super().train(mode)
        inner = self.model.model
        inner.audio_tower.train(mode and self.settings.encoder_trainable)
        if self.lm_mode is LMMode.FROZEN:
            inner.language_model.eval()
        if hasattr(inner, "visual"):
            inner.visual.eval()
        return self

    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] output projection, for losses that turn hidden states into logits chunk by chunk."""
        return self.model.lm_head.weight

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, param) for name, param in self.named_parameters() if param.requires_grad]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (projector / encoder / lora / lm), each with its own learning rate."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                part = part_of(self.kind, name)
                group = {PROJECTOR: "projector", AUDIO_ENCODER: "encoder"}.get(part)
                group = group or ("lora" if "lora_" in name else "lm")
                groups.setdefault(group, []).append(param)
        return groups

    # -- batches ------------------------------------------------------------------------------------------------

    def _audio_features(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Clips -> input_features [N, mel, 3000], feature_attention_mask [N, 3000] and audio tokens per clip."""
        max_samples = self.feature_extractor.n_samples
        for clip in clips:
            if len(clip) > max_samples:
                raise UserError(
                    f"prompt.audio: {len(clip) / SAMPLE_RATE:.1f} s is longer than the "
                    f"{max_samples / SAMPLE_RATE:.0f} s the {self.kind.value} encoder reads"
                )
        features = self.feature_extractor(
            clips,
            sampling_rate=SAMPLE_RATE,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
        )
        feature_mask = features["attention_mask"]  # N, 3000 (1 on real mel frames)
        _, token_counts = self.model.model.audio_tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        counts = [int(count) for count in token_counts]
        if min(counts) < MIN_AUDIO_TOKENS:
            raise UserError(
                f"prompt.audio: a clip gives {min(counts)} audio token(s); clips need at least 0.1 s"
            )
        return features["input_features"], feature_mask, counts

    def _assemble(
        self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]] | None, left_pad: bool
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Prompt (+ response + end-of-turn) rows -> model inputs (ids, masks, audio features) and prompt lengths."""
        if any(prompt.features is not None for prompt in prompts):
            raise UserError(
                f"prompt.features: cached encoder features are for the composable student; a {self.kind.value} "
                "student reads audio"
            )
        clips = [prompt.audio for prompt in prompts if prompt.audio is not None]
        counts: Iterator[int] = iter(())
        audio_inputs: dict[str, torch.Tensor] = {}
        if clips:
            input_features, feature_mask, token_counts = self._audio_features(clips)
            counts = iter(token_counts)
            audio_tower = self.model.model.audio_tower
            audio_inputs = {
                "input_features": input_features.to(audio_tower.device, audio_tower.dtype),
                "feature_attention_mask": feature_mask.to(audio_tower.device),
            }
        sequences: list[list[int]] = []
        prompt_lengths: list[int] = []
        for row, prompt in enumerate(prompts):
            if prompt.text is not None:
                ids = self.chat.prompt_ids(prompt.system, prompt.text)
                if self._audio_ids.intersection(ids):
                    raise UserError(f"prompt {row}: its text contains the model's audio special tokens")
            else:
                prefix, suffix = self.chat.split_prompt_ids(prompt.system)
                before, after = self._slot_ids
                ids = [*prefix, *before, *[self.audio_token_id] * next(counts), *after, *suffix]
            prompt_lengths.append(len(ids))
            if responses is not None:
                if self._audio_ids.intersection(responses[row]):
                    raise UserError(f"response {row}: contains the model's audio special tokens")
                ids = [*ids, *responses[row], self.chat.end_of_turn_id]
            sequences.append(ids)
        input_ids, attention_mask = pad_sequences(sequences, self.chat.pad_id, left_pad)  # B, T and B, T
        device = self.lm_head_weight().device
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            **audio_inputs,
        }
        return inputs, prompt_lengths

    def forward(
        self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]], return_hidden: bool = False
    ) -> LMOutput:
        """Teacher-forced pass over prompt + response + end-of-turn (right padding); see `LMOutput`."""
        check_batch(prompts, responses, self.model.get_input_embeddings().num_embeddings)
        inputs, prompt_lengths = self._assemble(prompts, responses, left_pad=False)
        batch_len = inputs["input_ids"].shape[1]
        prediction_mask, targets = prediction_layout(
            prompt_lengths, responses, self.chat.end_of_turn_id, batch_len
        )  # B, T and B, T
        device = inputs["input_ids"].device
        mask, targets = prediction_mask.to(device), targets.to(device)
        if return_hidden:
            hidden = self.model.model(
                **inputs, use_cache=False
            ).last_hidden_state  # B, T, H (after final norm)
            return LMOutput(None, hidden, mask, targets)
        return LMOutput(self.model(**inputs, use_cache=False).logits, None, mask, targets)  # logits: B, T, V

    def generate_ids(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[list[int]]:
        """Answer token ids per prompt (without the end-of-turn), batched with left padding and a KV cache."""
        check_batch(prompts, None)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                inputs, _ = self._assemble(prompts, None, left_pad=True)
                config = self.chat.generation_config(max_new_tokens, do_sample, temperature)
                sequences = self.model.generate(**inputs, generation_config=config)  # B, T + T_new
        finally:
            self.train(was_training)
        prompt_len = inputs["input_ids"].shape[1]
        return [self.chat.trim_generated(row[prompt_len:].tolist()) for row in sequences]

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[str]:
        """Answer text per prompt; text and audio prompts may be mixed in one batch."""
        return self.chat.decode_answers(self.generate_ids(prompts, max_new_tokens, do_sample, temperature))

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        """Write only the trainable tensors (safetensors) plus a JSON naming the base model and the settings."""
        return save_trainable(
            directory,
            self.trainable_parameters(),
            kind=self.kind.value,
            frozen_parts={"hf_model": self.source},
            settings=to_dict(self.settings),
        )

    def load(self, directory: Path) -> None:
        """Load trainable tensors saved by `save`, strictly: every key and shape must match this student."""
        mode = self.lm_mode.value
        meta = load_trainable(
            directory,
            self.trainable_parameters(),
            kind=self.kind.value,
            hint=lambda saved: (
                f" (saved with lm_mode {saved.get('settings', {}).get('lm_mode')}, this student: {mode})"
            ),
        )
        if meta.get("frozen_parts", {}).get("hf_model") != self.source:
            logger.warning("checkpoint %s was trained on %s; loading into %s", directory,
                           meta.get("frozen_parts"), self.source)  # fmt: skip


def _load_parts(source: str, kind: StudentKind, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(model, tokenizer, feature extractor) from a local checkpoint dir, or a hub id when the hub is allowed."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )
    from transformers import Qwen2AudioForConditionalGeneration as Qwen2Audio

    path = Path(source).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if not (path / "config.json").is_file() and (path.exists() or offline):
        raise UserError(f"student.hf_model: {source} is not a local checkpoint dir with config.json")
    location = str(path) if path.exists() else source
    model_class = (
        Qwen2Audio if kind is StudentKind.QWEN2_AUDIO else Qwen2_5OmniThinkerForConditionalGeneration
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(location)
        # A full Qwen2.5-Omni checkpoint loads as its thinker alone (the talker and token2wav are skipped).
        model = model_class.from_pretrained(location, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise UserError(f"student.hf_model: could not load {source} ({error})") from error
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer, feature_extractor


def build_hf_student(
    settings: StudentSettings,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    feature_extractor: WhisperFeatureExtractor | None = None,
    dtype: torch.dtype = torch.float32,
) -> HFSpeechLM:
    """The HF student `settings` describe (kind qwen2_audio / qwen2_5_omni); the three parts, given together,
    replace loading `settings.hf_model` (tests pass tiny models built in code)."""
    kind = StudentKind(settings.kind)
    given = [part is not None for part in (model, tokenizer, feature_extractor)]
    if any(given) and not all(given):
        raise ValueError("build_hf_student: pass model, tokenizer and feature_extractor together, or none")
    source = settings.hf_model or "<in-memory>"
    if model is None or tokenizer is None or feature_extractor is None:
        if not settings.hf_model:
            raise UserError(f"student.hf_model: required when student.kind is {kind.value}")
        model, tokenizer, feature_extractor = _load_parts(settings.hf_model, kind, dtype)
    student = HFSpeechLM(model, tokenizer, feature_extractor, settings=settings, source=source)
    if settings.init_from:
        student.load(Path(settings.init_from))
    return student
