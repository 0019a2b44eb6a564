"""The posterior-embedding connector on tiny models: bridge maths, masks, gradients, checkpoints, decoding.

The tiny Whisper here has a tokenizer of its own (the conftest one has none), because the bridge and the decoder's
special-token handling are defined through it. Its decoder is random, so tests check contracts (shapes, masks,
equalities between paths), never what it transcribes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd.errors import UserError
from cmkd.models.build import build_student
from cmkd.models.checkpoint import META_FILE, WEIGHTS_FILE
from cmkd.models.composable import ComposableSpeechLM
from cmkd.models.encoder import WhisperSpeechEncoder
from cmkd.models.posterior import (
    PosteriorFeatures,
    ends_in_a_loop,
    load_posterior_cache,
    posterior_features,
    save_posterior_cache,
    text_token_mask,
    window_samples,
)
from cmkd.models.posterior_connector import PosteriorConnector, build_vocab_bridge
from cmkd.models.projector import build_projector
from cmkd.models.speech_lm import Prompt
from cmkd.stage_configs import Activation, LMMode, ProjectorKind, ProjectorSettings, StudentSettings

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, WhisperForConditionalGeneration

MakeAudio = Callable[..., np.ndarray]
MakePosteriorStudent = Callable[..., ComposableSpeechLM]

SPEECH_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]  # ids 0, 1, 2
TOP_K = 3
SYSTEM = "Answer the question in a few words."


def _byte_level_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], eos: str
) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)


@pytest.fixture(scope="module")
def speech_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Whisper's three special tokens at ids 0-2, trained on question-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPEECH_SPECIALS, show_progress=False)
    corpus = [
        "what is the capital of france",
        "is the sun hot",
        "two plus two is four",
        "a cat and a dog",
    ] * 5
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture
def posterior_whisper(speech_tokenizer: PreTrainedTokenizerFast) -> WhisperForConditionalGeneration:
    """Whisper, 1 encoder + 1 decoder layer, d_model 32, the vocabulary of `speech_tokenizer`."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(speech_tokenizer), num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=0,
        decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.no_timestamps_token_id = 2
    model.generation_config.begin_suppress_tokens = [0]  # as tiny.en: no end-of-text as the first token
    return model


@pytest.fixture
def make_posterior_student(
    tiny_lm: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    posterior_whisper: WhisperForConditionalGeneration,
    speech_tokenizer: PreTrainedTokenizerFast,
) -> MakePosteriorStudent:
    def make(init_from: str = "", lm_mode: str = "frozen", max_tokens: int = 5) -> ComposableSpeechLM:
        torch.manual_seed(1)
        settings = StudentSettings(
            lm_mode=LMMode(lm_mode),
            projector=ProjectorSettings(
                kind=ProjectorKind.POSTERIOR,
                hidden=16,
                activation=Activation.GELU,
                posterior_top_k=TOP_K,
                posterior_max_tokens=max_tokens,
            ),
            init_from=init_from,
        )
        return build_student(
            settings, lm=tiny_lm, tokenizer=tiny_tokenizer, encoder=posterior_whisper,
            speech_tokenizer=speech_tokenizer,
        )  # fmt: skip

    return make


def _features(steps: int, vocab_size: int, hidden_size: int, seed: int) -> PosteriorFeatures:
    """Random posteriors over text tokens (ids >= 3), probabilities sorted descending like real top-k."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (steps, TOP_K), generator=generator)
    probs = torch.rand(steps, TOP_K, generator=generator).sort(dim=1, descending=True).values
    return PosteriorFeatures(ids, probs, torch.randn(steps, hidden_size, generator=generator))


def _connector(student: ComposableSpeechLM) -> PosteriorConnector:
    assert isinstance(student.projector, PosteriorConnector)
    return student.projector


# -- the bridge ---------------------------------------------------------------------------------------------------


def test_bridge_is_the_mean_lm_embedding_of_each_tokens_pieces() -> None:
    speech_vocab = {"<|endoftext|>": 0, "Ġ": 1, "p": 2, "a": 3, "r": 4, "i": 5, "s": 6, "Ġp": 7, "Ġpa": 8,
                    "Ġpar": 9, "Ġpari": 10, "Ġparis": 11, "Ã": 12}  # fmt: skip
    speech_merges = [("Ġ", "p"), ("Ġp", "a"), ("Ġpa", "r"), ("Ġpar", "i"), ("Ġpari", "s")]
    lm_vocab = {"<|im_end|>": 0, "Ġ": 1, "p": 2, "a": 3, "r": 4, "i": 5, "s": 6, "Ġp": 7, "Ġpa": 8, "Ġpar": 9,
                "is": 10}  # fmt: skip
    lm_merges = [("Ġ", "p"), ("Ġp", "a"), ("Ġpa", "r"), ("i", "s")]
    speech = _byte_level_tokenizer(speech_vocab, speech_merges, "<|endoftext|>")
    lm = _byte_level_tokenizer(lm_vocab, lm_merges, "<|im_end|>")
    assert lm(" paris", add_special_tokens=False)["input_ids"] == [9, 10]  # the handmade split: " par" + "is"
    embeddings = torch.randn(len(lm_vocab), 5)

    bridge, known = build_vocab_bridge(speech, lm, embeddings, speech_vocab_size=14)

    assert torch.allclose(bridge[11], (embeddings[9] + embeddings[10]) / 2)  # " paris" -> mean(" par", "is")
    assert torch.allclose(bridge[10], (embeddings[9] + embeddings[5]) / 2)  # " pari" -> mean(" par", "i")
    assert torch.equal(bridge[2], embeddings[2])  # a single piece maps to its own embedding
    # The special token, a lone UTF-8 lead byte (decodes to U+FFFD) and an id past the tokenizer are unknown.
    assert known.tolist() == [False] + [True] * 11 + [False, False]
    assert not bridge[[0, 12, 13]].any()


def test_text_token_mask_excludes_whisper_specials(speech_tokenizer: PreTrainedTokenizerFast) -> None:
    mask = text_token_mask(speech_tokenizer, len(speech_tokenizer) + 2)
    assert not mask[:3].any() and mask[3 : len(speech_tokenizer)].all() and not mask[-2:].any()


# -- the connector ------------------------------------------------------------------------------------------------


def test_zero_init_output_is_exactly_the_bridged_posteriors(
    make_posterior_student: MakePosteriorStudent,
) -> None:
    connector = _connector(make_posterior_student())
    vocab, width = connector.bridge.shape[0], connector.decoder.hidden_size
    features = [_features(4, vocab, width, seed=0), _features(2, vocab, width, seed=1)]
    features[0].topk_ids[1, 2] = 0  # an <|endoftext|> runner-up: no text, so it must not count

    embeds, step_mask = connector(features)

    for row, item in enumerate(features):
        for step in range(item.topk_ids.shape[0]):
            ids, probs = item.topk_ids[step], item.topk_probs[step].clone()
            probs[ids == 0] = 0
            expected = (probs[:, None] * connector.bridge[ids]).sum(0) / probs.sum()
            torch.testing.assert_close(embeds[row, step], expected)
    assert step_mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_shapes_and_masks_with_variable_decoded_lengths(make_posterior_student: MakePosteriorStudent) -> None:
    student = make_posterior_student()
    connector = _connector(student)
    vocab, width = connector.bridge.shape[0], connector.decoder.hidden_size
    features = [_features(n, vocab, width, seed=n) for n in (3, 0, 5)]
    with torch.no_grad():
        connector.linear_out.weight.normal_()  # a non-zero residual must still leave padded steps at zero
        embeds, step_mask = connector(features)
    assert embeds.shape == (3, 5, student.lm.config.hidden_size) and step_mask.sum(1).tolist() == [3, 0, 5]
    assert not embeds[~step_mask].any()

    prompts = [Prompt(system=SYSTEM, features=item.packed()) for item in features]
    inputs_embeds, _, prompt_lengths = student._assemble(prompts, None, left_pad=False)
    prefix, suffix = student.chat.split_prompt_ids(SYSTEM)
    assert prompt_lengths == [len(prefix) + n + len(suffix) for n in (3, 0, 5)]  # one LM position per step
    with torch.no_grad():
        first = connector(features[:1])[0][0]  # 3, H
    torch.testing.assert_close(inputs_embeds[0, len(prefix) : len(prefix) + 3], first)


def test_response_masks_line_up_between_text_and_posterior_prompts(
    make_posterior_student: MakePosteriorStudent,
) -> None:
    student = make_posterior_student()
    connector = _connector(student)
    features = _features(4, connector.bridge.shape[0], connector.decoder.hidden_size, seed=2)
    responses = [[40, 41, 42], [43]]
    prompts = [
        Prompt(system=SYSTEM, text="is the sun hot?"),
        Prompt(system=SYSTEM, features=features.packed()),
    ]
    output = student(prompts, [responses[0], responses[0]])
    rows = output.prediction_mask.sum(1).tolist()
    assert rows == [4, 4]  # len(response) + end-of-turn, whatever the prompt
    text_targets, speech_targets = (output.targets[row][output.prediction_mask[row]] for row in range(2))
    assert torch.equal(text_targets, speech_targets)
    assert student(prompts, responses).prediction_mask.sum(1).tolist() == [4, 2]


def test_gradients_reach_the_residual_only(
    make_posterior_student: MakePosteriorStudent, make_audio: MakeAudio
) -> None:
    student = make_posterior_student()
    connector = _connector(student)
    student.train()
    assert not connector.decoder.training and not student.encoder.whisper.training
    features = _features(3, connector.bridge.shape[0], connector.decoder.hidden_size, seed=3)
    prompts = [Prompt(features=features.packed()), Prompt(audio=make_audio(0.8))]
    output = student(prompts, [[40, 41], [42]])
    F.cross_entropy(output.logits[output.prediction_mask], output.targets[output.prediction_mask]).backward()

    trainable = {name for name, _ in student.trainable_parameters()}
    assert trainable == {f"projector.{name}" for name in ("norm.weight", "norm.bias", "linear_in.weight",
                         "linear_in.bias", "linear_out.weight", "linear_out.bias")}  # fmt: skip
    for name, param in student.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    assert connector.linear_out.weight.grad.abs().sum() > 0  # type: ignore[union-attr]
    # Zero output layer: nothing flows back into the layers before it until it has moved.
    assert not connector.linear_in.weight.grad.any()  # type: ignore[union-attr]
    assert set(student.parameter_groups()) == {"projector"}


# -- decoding, checkpoints, caches --------------------------------------------------------------------------------


def test_decoding_is_batch_invariant_and_keeps_text_tokens(
    make_posterior_student: MakePosteriorStudent, make_audio: MakeAudio
) -> None:
    student = make_posterior_student(max_tokens=6)
    connector = _connector(student)
    clips = [make_audio(0.6, seed=1), make_audio(2.5, seed=2), make_audio(1.1, seed=3)]
    batched = posterior_features(clips, student.encoder, connector.decoder, batch_size=3)
    alone = [posterior_features([clip], student.encoder, connector.decoder)[0] for clip in clips]
    for together, single in zip(batched, alone, strict=True):
        assert together.token_ids == single.token_ids
        torch.testing.assert_close(together.topk_probs, single.topk_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.decoder_hidden, single.decoder_hidden, atol=1e-4, rtol=1e-4)
    for item in batched:
        assert item.topk_ids.shape[0] <= 6 and item.top_k == TOP_K
        assert connector.decoder.text_token_mask[item.topk_ids[:, 0]].all()  # no specials kept
        assert bool((item.topk_probs[:, :-1] >= item.topk_probs[:, 1:]).all())


def test_generate_from_audio_equals_generate_from_cached_posteriors(
    make_posterior_student: MakePosteriorStudent, make_audio: MakeAudio
) -> None:
    student = make_posterior_student()
    clips = [make_audio(0.7, seed=5), make_audio(1.4, seed=6)]
    cached = posterior_features(clips, student.encoder, _connector(student).decoder)
    from_audio = student.generate_ids([Prompt(system=SYSTEM, audio=clip) for clip in clips], max_new_tokens=4)
    from_cache = student.generate_ids(
        [Prompt(system=SYSTEM, features=item.packed()) for item in cached], max_new_tokens=4
    )
    assert from_audio == from_cache and all(len(answer) <= 4 for answer in from_audio)
    mixed = [Prompt(audio=clips[0]), Prompt(text="is the sun hot?"), Prompt(features=cached[1].packed())]
    assert len(student.generate(mixed, max_new_tokens=3)) == 3


def test_save_load_round_trip_keeps_only_the_residual(
    make_posterior_student: MakePosteriorStudent, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    student = make_posterior_student()
    with torch.no_grad():
        for _, param in student.trainable_parameters():
            param.add_(0.05 * torch.randn_like(param))
    student.save(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved) == {name for name, _ in student.trainable_parameters()}
    assert not any("bridge" in name or "decoder" in name for name in saved)  # rebuilt from the frozen parts
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["settings"]["projector"]["kind"] == "posterior"
    assert meta["settings"]["projector"]["posterior_top_k"] == TOP_K

    restored = make_posterior_student(init_from=str(tmp_path))
    connector = _connector(student)
    features = [_features(4, connector.bridge.shape[0], connector.decoder.hidden_size, seed=4)]
    prompts = [Prompt(features=features[0].packed())]
    with torch.no_grad():
        assert torch.equal(restored(prompts, [[40]]).logits, student(prompts, [[40]]).logits)
        assert torch.equal(_connector(restored).bridge, connector.bridge)


def test_packed_features_and_the_cache_round_trip(tmp_path: Path) -> None:
    features = {"q1": _features(4, 50_000, 6, seed=7), "q2": _features(0, 50_000, 6, seed=8)}
    packed = features["q1"].packed()
    assert packed.shape == (4, 2 * TOP_K + 6) and packed.dtype == torch.float32
    unpacked = PosteriorFeatures.from_packed(packed, TOP_K)
    assert torch.equal(unpacked.topk_ids, features["q1"].topk_ids)
    with pytest.raises(UserError, match="must be float32"):
        PosteriorFeatures.from_packed(packed.half(), TOP_K)  # ids above 2048 do not survive fp16
    with pytest.raises(UserError, match="not whole"):
        PosteriorFeatures.from_packed(packed + 0.5, TOP_K)

    loaded = load_posterior_cache(save_posterior_cache(tmp_path / "posteriors.safetensors", features))
    assert list(loaded) == ["q1", "q2"] and loaded["q2"].topk_ids.shape == (0, TOP_K)
    assert torch.equal(loaded["q1"].topk_ids, features["q1"].topk_ids)
    torch.testing.assert_close(loaded["q1"].topk_probs, features["q1"].topk_probs, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(
        loaded["q1"].decoder_hidden, features["q1"].decoder_hidden, atol=1e-2, rtol=1e-3
    )


def test_loops_are_detected_and_redecoded_in_a_full_window(
    make_posterior_student: MakePosteriorStudent, make_audio: MakeAudio
) -> None:
    assert ends_in_a_loop([7, 1, 2, 3, 4, 1, 2, 3, 4])  # a 4-token block twice: a repeated sentence
    assert not ends_in_a_loop([9, 3, 8, 3, 8])  # a short repeat ("very very") is speech
    assert not ends_in_a_loop([1, 2, 3, 4, 5, 1, 2, 3, 4])
    student = make_posterior_student(max_tokens=6)
    encoder, decoder = student.encoder, _connector(student).decoder
    decoder.suppress_ids = [decoder.eos_id]  # Whisper never ends a row: every clip takes the fallback
    clips = [make_audio(0.9, seed=8), make_audio(1.6, seed=9)]
    short_then_full = posterior_features(clips, encoder, decoder)
    decoder.window_s = 30.0
    full = posterior_features(clips, encoder, decoder)
    for fallback, direct in zip(short_then_full, full, strict=True):
        assert fallback.token_ids == direct.token_ids
        torch.testing.assert_close(fallback.decoder_hidden, direct.decoder_hidden)


def test_window_gives_whisper_trailing_silence() -> None:
    assert window_samples(2 * 16_000, min_window_s=10.0) == 10 * 16_000
    assert window_samples(5 * 16_000, min_window_s=10.0) == 12 * 16_000  # at least 7 s after the speech
    assert window_samples(29 * 16_000, min_window_s=10.0) == 30 * 16_000  # never past Whisper's 30 s


def test_misuse_is_refused(
    make_posterior_student: MakePosteriorStudent,
    posterior_whisper: WhisperForConditionalGeneration,
    tiny_lm: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    make_audio: MakeAudio,
) -> None:
    settings = ProjectorSettings(kind=ProjectorKind.POSTERIOR, posterior_top_k=TOP_K)
    with pytest.raises(UserError, match="encoder_trainable"):
        build_student(StudentSettings(projector=settings, encoder_trainable=True), lm=tiny_lm,
                      tokenizer=tiny_tokenizer, encoder=posterior_whisper)  # fmt: skip
    with pytest.raises(UserError, match="whole Whisper model"):
        build_student(StudentSettings(projector=settings), lm=tiny_lm, tokenizer=tiny_tokenizer,
                      encoder=WhisperSpeechEncoder.from_model(posterior_whisper))  # fmt: skip
    with pytest.raises(UserError, match="not a frame projector"):
        build_projector(settings, 32, 64)
    student = make_posterior_student()
    frames, _ = student.encoder([make_audio(0.5)])
    with pytest.raises(UserError, match="posterior connector reads"):
        student([Prompt(features=frames[0])], [[40]])  # encoder frames are not packed posteriors
