"""Model wrappers on tiny random models: the response-mask contract, parity with plain transformers, isolation.

Parity tests compare against the plain transformers modules on the same inputs, so a wrapper that changes the
maths (a wrong splice, a shifted position, a leaked adapter) fails here rather than as a slow drift in training.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd.errors import UserError
from cmkd.models.build import build_student, build_teacher
from cmkd.models.checkpoint import META_FILE, WEIGHTS_FILE
from cmkd.models.composable import ComposableSpeechLM
from cmkd.models.encoder import WhisperSpeechEncoder, load_whisper_encoder
from cmkd.models.projector import build_projector
from cmkd.models.speech_lm import IGNORE_INDEX, ChatFormat, LMOutput, Prompt, SpeechLM
from cmkd.models.teacher import TextTeacher
from cmkd.models.vocab import VocabPlan, check_vocab
from cmkd.stage_configs import (
    Activation,
    DType,
    ProjectorKind,
    ProjectorSettings,
    StudentKind,
    StudentSettings,
    TeacherSettings,
)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, WhisperForConditionalGeneration

MakeStudent = Callable[..., ComposableSpeechLM]
MakeAudio = Callable[..., np.ndarray]

QUESTIONS = ["What is the capital of france?", "Is the sun hot?", "two plus two"]
RESPONSES = [[40, 41, 42], [], [43, 44, 45, 46, 47]]


def _ce_loss(output: LMOutput) -> torch.Tensor:
    logits = output.logits[output.prediction_mask]  # B, T, V -> N, V
    return F.cross_entropy(logits, output.targets[output.prediction_mask])


# -- prompts and chat framing -------------------------------------------------------------------------------------


def test_prompt_needs_exactly_one_input(make_audio: MakeAudio) -> None:
    with pytest.raises(UserError, match="exactly one of text, audio, features"):
        Prompt(system="s")
    with pytest.raises(UserError, match="exactly one"):
        Prompt(text="hi", audio=make_audio(0.5))
    with pytest.raises(UserError, match="prompt.audio"):
        Prompt(audio=np.zeros((2, 800), dtype=np.float32))


def test_batch_checks_name_the_bad_example(tiny_student: ComposableSpeechLM) -> None:
    prompts = [Prompt(text=QUESTIONS[0]), Prompt(text=QUESTIONS[1])]
    with pytest.raises(UserError, match="2 prompts but 1 responses"):
        tiny_student(prompts, [[1]])
    with pytest.raises(UserError, match=r"response 1: token ids outside"):
        tiny_student(prompts, [[1], [10**6]])


def test_split_prompt_brackets_the_user_text(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    chat = ChatFormat(tiny_tokenizer)
    assert chat.end_of_turn_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for system in (None, "Answer the question in a few words."):
        prefix, suffix = chat.split_prompt_ids(system)
        user_ids = tiny_tokenizer(QUESTIONS[0], add_special_tokens=False)["input_ids"]
        assert [*prefix, *user_ids, *suffix] == chat.prompt_ids(system, QUESTIONS[0])


# -- projector ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [ProjectorKind.STACK_MLP, ProjectorKind.CONV])  # frame projectors
@pytest.mark.parametrize("activation", list(Activation))
def test_projector_shapes_masks_and_batch_invariance(kind: ProjectorKind, activation: Activation) -> None:
    torch.manual_seed(0)
    projector = build_projector(
        ProjectorSettings(kind=kind, stack=4, hidden=32, activation=activation), 16, 24
    )
    lengths = [13, 8, 1]  # 13 and 1 are not multiples of 4
    frames = torch.randn(3, 13, 16)
    frame_mask = torch.arange(13) < torch.tensor(lengths)[:, None]
    embeds, embed_mask = projector(frames, frame_mask)
    assert embeds.shape == (3, 4, 24)
    assert embed_mask.sum(dim=1).tolist() == [4, 2, 1]  # ceil(length / 4)
    for row, length in enumerate(lengths):
        alone, alone_mask = projector(frames[row : row + 1, :length], torch.ones(1, length, dtype=torch.bool))
        assert alone_mask.all()
        torch.testing.assert_close(embeds[row][embed_mask[row]], alone[0], atol=1e-6, rtol=1e-5)


# -- encoder ------------------------------------------------------------------------------------------------------


def test_encoder_equals_transformers_on_a_full_window(tiny_whisper: WhisperForConditionalGeneration) -> None:
    encoder = WhisperSpeechEncoder.from_model(tiny_whisper)
    mel = torch.randn(1, 80, 3000)  # exactly what WhisperEncoder.forward insists on
    ours, frame_mask = encoder.encode_mel(mel, torch.tensor([3000]))
    with torch.no_grad():
        reference = tiny_whisper.get_encoder()(mel).last_hidden_state
    assert frame_mask.all()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_encoder_runs_on_real_length_and_ignores_batch_padding(
    tiny_whisper: WhisperForConditionalGeneration, make_audio: MakeAudio
) -> None:
    encoder = WhisperSpeechEncoder.from_model(tiny_whisper)
    clips = [make_audio(1.0), make_audio(0.37, seed=1)]  # 100 and 37 mel frames -> 50 and 19 encoder frames
    with torch.enable_grad():
        frames, frame_mask = encoder(clips)
    assert frames.shape == (2, 50, 64)
    assert frame_mask.sum(dim=1).tolist() == [50, 19]
    assert not frames.requires_grad  # frozen: no autograd graph kept
    assert frames[1, 19:].abs().sum() == 0
    alone, _ = encoder([clips[1]])
    torch.testing.assert_close(frames[1, :19], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="prompt.audio"):
        encoder([make_audio(31.0)])


def test_encoder_loads_from_a_checkpoint_dir(
    tiny_whisper: WhisperForConditionalGeneration, tmp_path: Path
) -> None:
    tiny_whisper.save_pretrained(tmp_path)
    encoder = load_whisper_encoder(str(tmp_path))
    assert torch.equal(encoder.whisper.layers[1].fc2.weight, tiny_whisper.get_encoder().layers[1].fc2.weight)
    with pytest.raises(UserError, match="student.encoder"):
        load_whisper_encoder(str(tmp_path / "missing"))


# -- the composable student ---------------------------------------------------------------------------------------


def test_response_positions_line_up_across_text_speech_and_teacher(
    make_student: MakeStudent,
    make_audio: MakeAudio,
    tiny_lm: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    student = make_student()
    assert isinstance(student, SpeechLM)
    eot = student.chat.end_of_turn_id
    clips = [make_audio(0.6), make_audio(2.3, seed=1), make_audio(1.1, seed=2)]
    text_prompts = [Prompt(text=question) for question in QUESTIONS]
    speech_prompts = [Prompt(audio=clip) for clip in clips]
    with torch.no_grad():
        features, frame_mask = student.encoder(clips[2:])
        cached_prompts = [*speech_prompts[:2], Prompt(features=features[0][frame_mask[0]])]
        outputs = [student(prompts, RESPONSES) for prompts in (text_prompts, speech_prompts, cached_prompts)]
    teacher_output = TextTeacher(tiny_lm, tiny_tokenizer).forward(text_prompts, RESPONSES)

    expected_targets = torch.tensor([token for response in RESPONSES for token in [*response, eot]])
    for output in [*outputs, teacher_output]:
        assert output.prediction_mask.sum(dim=1).tolist() == [len(response) + 1 for response in RESPONSES]
        assert torch.equal(output.targets[output.prediction_mask], expected_targets)
        assert (output.targets[~output.prediction_mask] == IGNORE_INDEX).all()
    # The prompts differ in length (text tokens vs audio embeddings), yet the rows still line up.
    assert outputs[0].logits.shape[1] != outputs[1].logits.shape[1]
    assert torch.equal(outputs[0].prediction_mask, teacher_output.prediction_mask)  # same ids as the teacher
    # Cached features give what the audio gives (float noise only: the encoder ran in a different batch).
    torch.testing.assert_close(outputs[2].logits, outputs[1].logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lm_mode", ["frozen", "lora"])
def test_text_mode_equals_the_plain_lm(
    make_student: MakeStudent, tiny_lm: LlamaForCausalLM, lm_mode: str
) -> None:
    student = make_student(lm_mode=lm_mode)  # LoRA at init adds exactly zero
    prompts = [Prompt(text=question) for question in QUESTIONS]
    with torch.no_grad():
        output = student(prompts, RESPONSES)
        for row, (prompt, response) in enumerate(zip(prompts, RESPONSES, strict=True)):
            ids = [*student.chat.prompt_ids(None, prompt.text or ""), *response, student.chat.end_of_turn_id]
            reference = tiny_lm(torch.tensor([ids])).logits[0]  # T_b, V on the bare transformers model
            torch.testing.assert_close(output.logits[row, : len(ids)], reference, atol=1e-5, rtol=1e-5)


def test_hidden_states_project_to_the_logits(make_student: MakeStudent, make_audio: MakeAudio) -> None:
    student = make_student(lm_mode="lora")
    prompts = [Prompt(text=QUESTIONS[0]), Prompt(audio=make_audio(0.8))]
    with torch.no_grad():
        output = student(prompts, RESPONSES[:2])
        hidden_output = student(prompts, RESPONSES[:2], return_hidden=True)
    assert hidden_output.logits is None and hidden_output.hidden is not None
    projected = hidden_output.hidden @ student.lm_head_weight().T  # B, T, H -> B, T, V
    torch.testing.assert_close(projected, output.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_mode", ["frozen", "lora"])
def test_gradients_reach_trainable_parts_only(
    make_student: MakeStudent, make_audio: MakeAudio, lm_mode: str
) -> None:
    student = make_student(lm_mode=lm_mode)
    student.train()
    output = student([Prompt(audio=make_audio(0.7)), Prompt(text=QUESTIONS[1])], RESPONSES[:2])
    _ce_loss(output).backward()
    trainable = {name for name, _ in student.trainable_parameters()}
    for name, param in student.named_parameters():
        if name in trainable:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    assert any(name.startswith("projector.") for name in trainable)
    assert all(name.startswith("projector.") or "lora_" in name for name in trainable)
    lora_b_grads = [param.grad for name, param in student.named_parameters() if "lora_B" in name]
    assert (len(lora_b_grads) > 0) == (lm_mode == "lora")
    assert all(grad is not None and grad.abs().sum() > 0 for grad in lora_b_grads)
    expected_groups = {"projector", "lora"} if lm_mode == "lora" else {"projector"}
    assert set(student.parameter_groups()) == expected_groups
    assert not student.encoder.whisper.training  # frozen parts stay in eval mode under student.train()


def test_trainable_encoder_gets_gradients_and_its_own_group(
    make_student: MakeStudent, make_audio: MakeAudio
) -> None:
    student = make_student(lm_mode="full", encoder_trainable=True)
    student.train()
    assert student.encoder.whisper.training
    _ce_loss(student([Prompt(audio=make_audio(0.6))], [RESPONSES[0]])).backward()
    assert student.encoder.whisper.conv1.weight.grad is not None
    assert set(student.parameter_groups()) == {"projector", "encoder", "lm"}


def test_save_load_round_trip_keeps_only_trainable_tensors(
    make_student: MakeStudent, make_audio: MakeAudio, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    student = make_student(lm_mode="lora")
    with torch.no_grad():
        for _, param in student.trainable_parameters():  # move off the init so the round trip is not trivial
            param.add_(0.05 * torch.randn_like(param))
    student.save(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved) == {name for name, _ in student.trainable_parameters()}
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["settings"]["projector"]["stack"] == 4 and set(meta["frozen_parts"]) == {"lm", "encoder"}

    restored = make_student(lm_mode="lora", init_from=str(tmp_path))
    prompts = [Prompt(text=QUESTIONS[0]), Prompt(audio=make_audio(0.9))]
    with torch.no_grad():
        assert torch.equal(restored(prompts, RESPONSES[:2]).logits, student(prompts, RESPONSES[:2]).logits)


def test_load_rejects_a_checkpoint_of_another_config(make_student: MakeStudent, tmp_path: Path) -> None:
    make_student(stack=4).save(tmp_path / "stack4")
    with pytest.raises(UserError, match=r"key 'projector\..*stack=4 \(this student: 2\)"):
        make_student(stack=2).load(tmp_path / "stack4")
    with pytest.raises(UserError, match="lora_A.*lm_mode=frozen"):
        make_student(lm_mode="lora").load(tmp_path / "stack4")
    with pytest.raises(UserError, match="needs trainable.safetensors"):
        make_student().load(tmp_path / "nothing-here")


def test_batched_generate_equals_one_by_one(make_student: MakeStudent, tiny_lm: LlamaForCausalLM) -> None:
    student = make_student()
    prompts = [Prompt(text=question) for question in QUESTIONS]  # different lengths -> left padding
    batched = student.generate_ids(prompts, max_new_tokens=6)
    assert batched == [student.generate_ids([prompt], max_new_tokens=6)[0] for prompt in prompts]
    assert all(len(answer) > 0 for answer in batched)
    teacher = TextTeacher(tiny_lm, student.tokenizer)  # same weights, plain input_ids path
    assert teacher.generate_ids(prompts, max_new_tokens=6) == batched
    assert student.generate(prompts, max_new_tokens=6) == teacher.generate(prompts, max_new_tokens=6)


def test_generate_from_audio_and_features(make_student: MakeStudent, make_audio: MakeAudio) -> None:
    student = make_student(kind="conv", activation="gelu")
    features, frame_mask = student.encoder([make_audio(0.5, seed=3)])
    prompts = [
        Prompt(audio=make_audio(1.2)),
        Prompt(text=QUESTIONS[2]),
        Prompt(features=features[0][frame_mask[0]]),
    ]
    answers = student.generate_ids(prompts, max_new_tokens=4)
    assert len(answers) == 3 and all(len(answer) <= 4 for answer in answers)
    assert answers[0] == student.generate_ids(prompts[:1], max_new_tokens=4)[0]
    assert len(student.generate(prompts, max_new_tokens=4)) == 3


# -- teacher ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["same_object_lora", "same_object_full", "same_checkpoint_full"])
def test_student_training_never_reaches_the_teacher(
    tiny_lm: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    tiny_whisper: WhisperForConditionalGeneration,
    tmp_path: Path,
    sharing: str,
) -> None:
    from transformers import LlamaForCausalLM

    lm_mode = "lora" if sharing.endswith("lora") else "full"
    student_lm, teacher_lm = tiny_lm, tiny_lm
    if sharing == "same_checkpoint_full":
        tiny_lm.save_pretrained(tmp_path)
        student_lm = LlamaForCausalLM.from_pretrained(tmp_path)
        teacher_lm = LlamaForCausalLM.from_pretrained(tmp_path)
    teacher = build_teacher(TeacherSettings(), model=teacher_lm, tokenizer=tiny_tokenizer)
    settings = StudentSettings(lm_mode=lm_mode, projector=ProjectorSettings(stack=4, hidden=32))
    student = build_student(settings, lm=student_lm, tokenizer=tiny_tokenizer, encoder=tiny_whisper)
    prompts = [Prompt(text=question) for question in QUESTIONS]
    before = teacher.forward(prompts, RESPONSES).logits

    student.train()
    optimizer = torch.optim.AdamW([param for _, param in student.trainable_parameters()], lr=1e-2)
    student_before = student(prompts, RESPONSES).logits.detach()
    _ce_loss(student(prompts, RESPONSES)).backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(student(prompts, RESPONSES).logits, student_before)  # the student did move
    after = teacher.forward(prompts, RESPONSES)
    assert torch.equal(after.logits, before)
    assert not after.logits.requires_grad


def test_teacher_refuses_audio_and_adapter_carrying_models(
    make_student: MakeStudent,
    make_audio: MakeAudio,
    tiny_lm: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    teacher = TextTeacher(tiny_lm, tiny_tokenizer, DType.FLOAT32)
    with pytest.raises(UserError, match="text prompts only"):
        teacher.forward([Prompt(audio=make_audio(0.5))], [[1]])
    student = make_student(lm_mode="lora")
    with pytest.raises(UserError, match="peft adapters"):
        TextTeacher(student.lm.get_base_model(), tiny_tokenizer)


def test_teacher_in_lower_precision(
    tiny_lm: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    teacher = TextTeacher(tiny_lm, tiny_tokenizer, DType.BFLOAT16)
    output = teacher.forward([Prompt(text=QUESTIONS[0])], [RESPONSES[0]])
    assert output.logits is not None and output.logits.dtype == torch.bfloat16
    assert output.prediction_mask.sum() == len(RESPONSES[0]) + 1


# -- vocabulary check and build -----------------------------------------------------------------------------------


def test_check_vocab(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    real = len(tiny_tokenizer)
    same = copy.deepcopy(tiny_tokenizer)
    assert check_vocab(tiny_tokenizer, same, real, real, True) == VocabPlan(slice_to=real)
    # Same tokenizer, output layers padded to different sizes (as Qwen2.5 sizes are): compare the shared rows.
    assert check_vocab(tiny_tokenizer, tiny_tokenizer, real + 64, real + 192, True) == VocabPlan(
        slice_to=real + 64
    )
    with pytest.raises(UserError, match="student.lm: its output layer has"):
        check_vocab(tiny_tokenizer, tiny_tokenizer, real, real - 1, True)

    different = copy.deepcopy(tiny_tokenizer)
    different.add_tokens(["<|extra|>"])  # a different mapping: one more token
    with pytest.raises(UserError, match=r"shared vocabulary.*kd_weight=0"):
        check_vocab(tiny_tokenizer, different, real, real + 1, True)
    assert check_vocab(tiny_tokenizer, different, real, real + 1, False) == VocabPlan(
        slice_to=0, shared_vocab=False
    )


def test_build_student_routes_hf_speech_llms_and_names_a_missing_checkpoint() -> None:
    settings = StudentSettings(kind=StudentKind.QWEN2_AUDIO, hf_model="/models/qwen2-audio")
    with pytest.raises(
        UserError, match="student.hf_model: /models/qwen2-audio is not a local checkpoint dir"
    ):
        build_student(settings)
