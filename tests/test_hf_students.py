"""HF speech-LLM students (Qwen2-Audio, Qwen2.5-Omni thinker) on tiny random configs built in code.

The reference in each parity test is plain transformers: the model called on the ids, features and masks that
the HF processor code makes from the fully rendered prompt string. Our wrapper must give the same logits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from cmkd.errors import UserError
from cmkd.models.dry_run import Strategy, dry_run
from cmkd.models.hf_students import LM, HFSpeechLM, build_hf_student
from cmkd.models.speech_lm import Prompt, SpeechLM
from cmkd.stage_configs import LMMode, LoraSettings, StudentKind, StudentSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor

AUDIO_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
SLOT = {StudentKind.QWEN2_AUDIO: "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
        StudentKind.QWEN2_5_OMNI: "<|audio_bos|><|AUDIO|><|audio_eos|>"}  # fmt: skip
KINDS = [StudentKind.QWEN2_AUDIO, StudentKind.QWEN2_5_OMNI]
TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "initializer_range": 0.2}  # fmt: skip
AUDIO = {"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
         "num_mel_bins": 80, "max_source_positions": 1500}  # fmt: skip


@pytest.fixture
def audio_tokenizer(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The conftest ChatML tokenizer plus Qwen's audio (and vision) special tokens, as named attributes."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(tiny_tokenizer.backend_tokenizer),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        extra_special_tokens=AUDIO_TOKENS,
    )
    tokenizer.chat_template = tiny_tokenizer.chat_template
    return tokenizer


@pytest.fixture
def feature_extractor() -> WhisperFeatureExtractor:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=AUDIO["num_mel_bins"], sampling_rate=16_000)


def tiny_model(kind: StudentKind, tokenizer: PreTrainedTokenizerFast) -> Any:
    """A seeded tiny random model of `kind` whose special-token ids are the tokenizer's."""
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if kind is StudentKind.QWEN2_AUDIO:
        config = Qwen2AudioConfig(
            audio_config={"model_type": "qwen2_audio_encoder", **AUDIO},
            text_config={"model_type": "qwen2", **text},
            audio_token_id=tokenizer.audio_token_id,
        )
        return Qwen2AudioForConditionalGeneration(config).eval()
    config = Qwen2_5OmniThinkerConfig(
        audio_config={**AUDIO, "output_dim": TEXT["hidden_size"]},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                       "out_hidden_size": TEXT["hidden_size"], "fullatt_block_indexes": [0]},
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}},
        audio_token_id=tokenizer.audio_token_id,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        audio_start_token_id=tokenizer.audio_bos_token_id,
        audio_end_token_id=tokenizer.audio_eos_token_id,
    )  # fmt: skip
    return Qwen2_5OmniThinkerForConditionalGeneration(config).eval()


@pytest.fixture
def make_hf_student(
    audio_tokenizer: PreTrainedTokenizerFast, feature_extractor: WhisperFeatureExtractor
) -> Callable[..., HFSpeechLM]:
    def make(kind: StudentKind, lm_mode: str = "frozen", **settings: Any) -> HFSpeechLM:
        student_settings = StudentSettings(
            kind=kind, hf_model="tiny", lm_mode=LMMode(lm_mode),
            lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), **settings,
        )  # fmt: skip
        model = tiny_model(kind, audio_tokenizer)
        return build_hf_student(
            student_settings, model=model, tokenizer=audio_tokenizer, feature_extractor=feature_extractor
        )

    return make


def _plain_audio_inputs(
    kind: StudentKind,
    tokenizer: PreTrainedTokenizerFast,
    extractor: WhisperFeatureExtractor,
    clip: np.ndarray,
) -> dict[str, torch.Tensor]:
    """What the family's HF processor makes of the fully rendered one-turn prompt with one audio item."""
    from transformers import Qwen2_5OmniProcessor, Qwen2AudioProcessor

    text = tokenizer.apply_chat_template([{"role": "user", "content": SLOT[kind]}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    if kind is StudentKind.QWEN2_AUDIO:
        processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer)
        return dict(processor(text=[text], audio=[clip], return_tensors="pt"))
    # Qwen2_5OmniProcessor cannot be built without torchvision (its video processor needs it), so its own
    # audio path (`_process_audio`: feature extraction + placeholder expansion) runs on a bare instance.
    processor = object.__new__(Qwen2_5OmniProcessor)
    processor.feature_extractor, processor.audio_token = extractor, tokenizer.audio_token
    audio_inputs, replacements = processor._process_audio(
        [clip], sampling_rate=16_000, return_attention_mask=True, return_tensors="pt"
    )
    expanded = text.replace(tokenizer.audio_token, replacements[0])
    ids = tokenizer(expanded, add_special_tokens=False, return_tensors="pt")
    features = {key: audio_inputs[key] for key in ("input_features", "feature_attention_mask")}
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], **features}


def _with_response(
    inputs: dict[str, torch.Tensor], response: list[int], end_of_turn: int
) -> dict[str, torch.Tensor]:
    tail = torch.tensor([[*response, end_of_turn]])
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    return extended


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_plain_transformers_in_text_and_audio_mode(
    kind: StudentKind,
    make_hf_student: Callable[..., HFSpeechLM],
    audio_tokenizer: PreTrainedTokenizerFast,
    feature_extractor: WhisperFeatureExtractor,
    make_audio: Callable[..., np.ndarray],
) -> None:
    student = make_hf_student(kind, lm_mode="lora")  # fresh LoRA adapters are zero: the model is unchanged
    assert isinstance(student, SpeechLM)
    question, clip = "What is the capital of france?", make_audio(1.3)
    response = audio_tokenizer("paris is a city.", add_special_tokens=False)["input_ids"]
    eot = student.chat.end_of_turn_id

    text_ids = audio_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=True)["input_ids"]  # fmt: skip
    plain_text = _with_response({"input_ids": torch.tensor([list(text_ids)])}, response, eot)
    plain_audio = _with_response(
        _plain_audio_inputs(kind, audio_tokenizer, feature_extractor, clip), response, eot
    )
    with torch.no_grad():
        expected_text = student.model(**plain_text).logits[0]  # T_text, V
        expected_audio = student.model(**plain_audio).logits[0]  # T_audio, V
        # Batched, mixed and right-padded: each row's real positions must equal its own plain run.
        output = student([Prompt(text=question), Prompt(audio=clip)], [response, response])
    assert output.logits is not None
    text_len, audio_len = expected_text.shape[0], expected_audio.shape[0]
    assert audio_len > text_len  # 1.3 s of audio is more tokens than the question's words
    torch.testing.assert_close(output.logits[0, :text_len], expected_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output.logits[1, :audio_len], expected_audio, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        hidden = student([Prompt(audio=clip)], [response], return_hidden=True).hidden
    assert hidden is not None
    projected = hidden[0] @ student.lm_head_weight().T  # T, H -> T, V
    torch.testing.assert_close(projected, expected_audio, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_response_masks_line_up_between_text_and_audio_prompts(
    kind: StudentKind, make_hf_student: Callable[..., HFSpeechLM], make_audio: Callable[..., np.ndarray]
) -> None:
    student = make_hf_student(kind)
    responses = [[40, 41, 42], [50, 51, 52, 53, 54]]
    prompts = [Prompt(text="a cat is blue."), Prompt(audio=make_audio(2.0, seed=1), system="Answer briefly.")]
    with torch.no_grad():
        text_out = student([prompts[0], prompts[0]], responses)
        audio_out = student([prompts[1], prompts[1]], responses)
    for output in (text_out, audio_out):
        assert output.prediction_mask.sum(dim=1).tolist() == [len(r) + 1 for r in responses]
    for row, response in enumerate(responses):
        expected = [*response, student.chat.end_of_turn_id]
        assert text_out.targets[row][text_out.prediction_mask[row]].tolist() == expected
        assert audio_out.targets[row][audio_out.prediction_mask[row]].tolist() == expected
    assert audio_out.prediction_mask.shape[1] > text_out.prediction_mask.shape[1]  # different prompt lengths


@pytest.mark.parametrize("kind", KINDS)
def test_generate_runs_for_text_and_audio_and_matches_plain_greedy(
    kind: StudentKind,
    make_hf_student: Callable[..., HFSpeechLM],
    audio_tokenizer: PreTrainedTokenizerFast,
    feature_extractor: WhisperFeatureExtractor,
    make_audio: Callable[..., np.ndarray],
) -> None:
    student = make_hf_student(kind)
    clip = make_audio(1.0, seed=2)
    answers = student.generate_ids([Prompt(text="What is water?"), Prompt(audio=clip)], max_new_tokens=5)
    assert len(answers) == 2 and all(len(answer) <= 5 for answer in answers)
    texts = student.generate([Prompt(audio=clip)], max_new_tokens=5)
    assert len(texts) == 1 and isinstance(texts[0], str)

    plain = _plain_audio_inputs(kind, audio_tokenizer, feature_extractor, clip)
    config = student.chat.generation_config(5, do_sample=False, temperature=1.0)
    with torch.no_grad():
        sequences = student.model.generate(**plain, generation_config=config)
    expected = student.chat.trim_generated(sequences[0, plain["input_ids"].shape[1] :].tolist())
    assert answers[1] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parts_follow_lm_mode_and_lora_matches_the_dry_run(
    tmp_path: Path, kind: StudentKind, make_hf_student: Callable[..., HFSpeechLM]
) -> None:
    frozen = make_hf_student(kind)
    assert set(frozen.parameter_groups()) == {"projector"}
    frozen.train()  # frozen parts stay in eval mode: no dropout on what does not learn
    inner = frozen.model.model
    assert frozen.training and not inner.audio_tower.training and not inner.language_model.training
    assert (
        inner.multi_modal_projector.training if kind is StudentKind.QWEN2_AUDIO else not inner.visual.training
    )
    full = make_hf_student(kind, lm_mode="full", encoder_trainable=True)
    assert set(full.parameter_groups()) == {"projector", "lm", "encoder"}
    assert not any("visual" in name or "embed_positions" in name for name, _ in full.trainable_parameters())
    lora = make_hf_student(kind, lm_mode="lora")
    assert set(lora.parameter_groups()) == {"projector", "lora"}
    assert all("language_model" in name for name, _ in lora.trainable_parameters() if "lora_" in name)

    lora.model.config.save_pretrained(tmp_path)
    planned = dry_run(replace(lora.settings, hf_model=str(tmp_path)), "smollm2", Strategy(n_gpus=1))
    lora_count = sum(param.numel() for name, param in lora.trainable_parameters() if "lora_" in name)
    assert planned.part(LM).trainable == lora_count
    assert planned.trainable_params == sum(param.numel() for _, param in lora.trainable_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trips_only_trainable_weights(
    tmp_path: Path, kind: StudentKind, make_hf_student: Callable[..., HFSpeechLM]
) -> None:
    from safetensors.torch import load_file

    student = make_hf_student(kind, lm_mode="lora")
    with torch.no_grad():
        for _, param in student.trainable_parameters():
            param.add_(torch.randn_like(param))
    student.save(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "trainable.safetensors"))
    assert set(saved) == {name for name, _ in student.trainable_parameters()}

    fresh = make_hf_student(kind, lm_mode="lora")
    fresh.load(tmp_path / "ckpt")
    for (name, param), (_, loaded) in zip(
        student.trainable_parameters(), fresh.trainable_parameters(), strict=True
    ):
        assert torch.equal(param, loaded), name
    with pytest.raises(UserError, match="is missing"):
        make_hf_student(kind, lm_mode="full").load(tmp_path / "ckpt")


def test_bad_inputs_are_user_errors(
    make_hf_student: Callable[..., HFSpeechLM], make_audio: Callable[..., np.ndarray]
) -> None:
    student = make_hf_student(StudentKind.QWEN2_AUDIO)
    with pytest.raises(UserError, match="longer than the 30 s"):
        student([Prompt(audio=make_audio(31.0))], [[40]])
    with pytest.raises(UserError, match="at least 0.1 s"):
        student([Prompt(audio=make_audio(0.03))], [[40]])
    with pytest.raises(UserError, match="composable student"):
        student([Prompt(features=torch.zeros(4, 16))], [[40]])
    with pytest.raises(UserError, match="audio special tokens"):
        student([Prompt(text="hi")], [[student.audio_token_id]])
    with pytest.raises(UserError, match="needs qwen2_5_omni_thinker"):
        HFSpeechLM(student.model, student.tokenizer, student.feature_extractor,
                   settings=StudentSettings(kind=StudentKind.QWEN2_5_OMNI, hf_model="x"), source="x")  # fmt: skip
    with pytest.raises(UserError, match="student.hf_model"):
        build_hf_student(StudentSettings(kind=StudentKind.QWEN2_AUDIO, hf_model="/no/such/dir"))


@pytest.mark.parametrize("kind", KINDS)
def test_builds_from_a_saved_checkpoint_dir(
    tmp_path: Path,
    kind: StudentKind,
    make_hf_student: Callable[..., HFSpeechLM],
    make_audio: Callable[..., np.ndarray],
) -> None:
    """The loading path: model, tokenizer (with its audio tokens and chat template) and feature extractor."""
    in_memory = make_hf_student(kind)
    in_memory.model.save_pretrained(tmp_path)
    in_memory.tokenizer.save_pretrained(tmp_path)
    in_memory.feature_extractor.save_pretrained(tmp_path)
    loaded = build_hf_student(StudentSettings(kind=kind, hf_model=str(tmp_path)))
    prompts, responses = (
        [Prompt(audio=make_audio(0.8, seed=3)), Prompt(text="What is the sun?")],
        [[40, 41], [42]],
    )
    with torch.no_grad():
        expected, actual = in_memory(prompts, responses), loaded(prompts, responses)
    assert expected.logits is not None and actual.logits is not None
    torch.testing.assert_close(actual.logits, expected.logits)
    assert torch.equal(actual.prediction_mask, expected.prediction_mask)
