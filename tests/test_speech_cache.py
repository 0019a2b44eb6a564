"""The prepare-stage speech cache end to end: the ASR check's Whisper decode becomes the posterior cache, and
training and evaluation read the cache only when it matches the student, with the same result as from audio."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cmkd.data.posterior_asr as posterior_asr
from cmkd.config import load_config
from cmkd.data.audio import load_audio
from cmkd.data.features import (
    FeatureCache,
    encode_clip,
    feature_meta,
    read_feature_meta,
    write_clip_features,
    write_feature_meta,
)
from cmkd.data.posterior_asr import PosteriorWhisperASR
from cmkd.data.prepare import run_prepare
from cmkd.data.records import read_manifest
from cmkd.data.speech_inputs import SpeechInputs
from cmkd.errors import UserError
from cmkd.models.encoder import WhisperSpeechEncoder
from cmkd.models.posterior import posterior_features
from cmkd.models.speech_lm import Prompt
from cmkd.stage_configs import FeatureKind, FeatureSettings, PrepareConfig, TrainConfig
from cmkd.train.loop import run_training
from test_connector import TOP_K, make_posterior_student, posterior_whisper, speech_tokenizer  # noqa: F401
from test_prepare import QUESTIONS, Calls, make_config, tiny_backends, tts_counter, write_source  # noqa: F401
from test_train import overrides, tiny_run  # noqa: F401  (fixture)

MAX_TOKENS = 5


def _posterior_settings(**changes: Any) -> FeatureSettings:
    settings: dict[str, Any] = {
        "encoder": "tiny",
        "kind": FeatureKind.POSTERIOR,
        "posterior_top_k": TOP_K,
        "posterior_max_tokens": MAX_TOKENS,
    }
    return FeatureSettings(**(settings | changes))


@pytest.fixture
def prepared(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any,  # noqa: F811
    posterior_whisper: Any, speech_tokenizer: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:  # fmt: skip
    """`cmkd prepare` with the default recogniser (posterior decoding) on a tiny random Whisper."""
    decoded: list[int] = []

    def counting(audios: Any, *args: Any, **kwargs: Any) -> Any:
        decoded.append(len(audios))
        return posterior_features(audios, *args, **kwargs)

    monkeypatch.setattr(posterior_asr, "posterior_features", counting)
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, Calls())
    backends.make_asr, backends.asr_name = None, ""  # the default: PosteriorWhisperASR under the settings

    def make_posterior(settings: FeatureSettings) -> PosteriorWhisperASR:
        return PosteriorWhisperASR(
            posterior_whisper, speech_tokenizer, source=settings.encoder, top_k=settings.posterior_top_k,
            max_tokens=settings.posterior_max_tokens, window_s=settings.posterior_window_s,
        )  # fmt: skip

    backends.make_posterior = make_posterior
    root = tmp_path / "data"
    cfg = make_config(root, write_source(tmp_path))
    cfg.tts.max_wer = 1e9  # a random decoder hears nothing right; keep every clip
    features = _posterior_settings()
    run_prepare(cfg, root, progress=False, features=features, heldout_fraction=0.3, backends=backends)
    return {"root": root, "cfg": cfg, "features": features, "backends": backends, "decoded": decoded}


def test_the_asr_decode_is_the_posterior_cache(prepared: dict[str, Any], speech_tokenizer: Any) -> None:  # noqa: F811
    root: Path = prepared["root"]
    records = read_manifest(root / "train.jsonl") + read_manifest(root / "heldout.jsonl")
    clips = [clip for record in records for clip in record.speech]
    assert clips
    meta = read_feature_meta(root)
    assert meta is not None and meta.kind == "posterior"
    assert meta.decode == f"top_k={TOP_K},max_tokens={MAX_TOKENS},window_s=10"
    # One decode per clip: the features stage reused the ASR check's posteriors.
    synthesised = len(list((root / "audio").rglob("*.flac")))
    assert sum(prepared["decoded"]) == synthesised

    asr = prepared["backends"].make_posterior(prepared["features"])
    cache = FeatureCache(root)
    for record in records:
        for clip in record.speech:
            audio = load_audio(root / clip.audio)
            (online,) = asr.features([audio])
            torch.testing.assert_close(cache.get(clip.audio), online.packed(), rtol=1e-5, atol=1e-5)
            # The manifest's transcript is the cached decode's top-1 text.
            assert (
                clip.transcript == speech_tokenizer.decode(online.token_ids, skip_special_tokens=True).strip()
            )


def test_changed_decode_settings_need_overwrite_and_then_rebuild(prepared: dict[str, Any]) -> None:
    root, cfg = prepared["root"], prepared["cfg"]
    other = _posterior_settings(posterior_max_tokens=MAX_TOKENS - 1)
    with pytest.raises(UserError, match="overwrite"):
        run_prepare(
            cfg, root, progress=False, features=other, heldout_fraction=0.3, backends=prepared["backends"]
        )
    cfg.run.overwrite = True
    run_prepare(
        cfg, root, progress=False, features=other, heldout_fraction=0.3, backends=prepared["backends"]
    )
    meta = read_feature_meta(root)
    assert meta is not None and "max_tokens=4" in meta.decode


def test_posterior_cache_needs_float32() -> None:
    with pytest.raises(UserError, match="features.dtype"):
        load_config(PrepareConfig, None, ["features.kind=posterior", "features.dtype=bfloat16"])


def test_student_reads_the_cache_only_when_it_matches(
    prepared: dict[str, Any],
    make_posterior_student: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    root: Path = prepared["root"]
    clip = read_manifest(root / "train.jsonl")[0].speech[0]
    audio = load_audio(root / clip.audio)
    student = make_posterior_student(max_tokens=MAX_TOKENS)
    speech = SpeechInputs.open(root, student, load_audio, "test")
    assert speech.cache is not None
    cached = speech.prompt("Be brief.", root / clip.audio, clip.audio)
    assert cached.features is not None and speech.read_from_cache == 1
    response = [[5, 6, 7]]
    with torch.no_grad():
        from_cache = student([cached], response).logits
        from_audio = student([Prompt("Be brief.", audio=audio)], response).logits
    torch.testing.assert_close(from_cache, from_audio, rtol=1e-4, atol=1e-4)

    with caplog.at_level(logging.INFO, logger="cmkd.data.speech_inputs"):
        other = SpeechInputs.open(root, make_posterior_student(max_tokens=MAX_TOKENS - 1), load_audio, "test")
    assert other.cache is None
    assert "max_tokens" in caplog.text and "from audio" in caplog.text
    assert other.prompt(None, root / clip.audio, clip.audio).audio is not None


def test_training_from_the_frame_cache_equals_training_from_audio(
    tiny_run: dict[str, Path],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tiny_run["data"]
    encoder = WhisperSpeechEncoder.from_pretrained(tiny_run["whisper"])
    settings = FeatureSettings(encoder=str(tiny_run["whisper"]))
    write_feature_meta(data, feature_meta(encoder, settings))
    for record in read_manifest(data / "train.jsonl"):
        for clip in record.speech:
            write_clip_features(
                data, clip.audio, encode_clip(encoder, load_audio(data / clip.audio)), settings.dtype
            )

    losses = {}
    for name in ("cache", "audio"):
        if name == "audio":
            shutil.rmtree(data / "features")
        cfg = load_config(TrainConfig, None, overrides(tiny_run, tiny_run["root"] / name, "train.steps=3"))
        with caplog.at_level(logging.INFO, logger="cmkd.data.speech_inputs"):
            run_training(cfg, cfg.run.out_dir, progress=False)
        assert ("from the frames cache" in caplog.text) == (name == "cache")
        caplog.clear()
        rows = [json.loads(line) for line in (cfg.run.out_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = np.array([row["loss"] for row in rows if "loss" in row])
    np.testing.assert_allclose(losses["cache"], losses["audio"], rtol=1e-4)


def test_dry_run_counts_the_posterior_connector_like_a_built_one(
    tmp_path: Path,
    make_posterior_student: Any,  # noqa: F811
    tiny_lm: Any,
    posterior_whisper: Any,  # noqa: F811
) -> None:
    from cmkd.models.dry_run import Sharding, Strategy, dry_run
    from cmkd.models.hf_students import AUDIO_ENCODER, LM, PROJECTOR

    student = make_posterior_student(lm_mode="lora")
    tiny_lm.config.save_pretrained(tmp_path / "lm")
    posterior_whisper.config.save_pretrained(tmp_path / "whisper")
    settings = replace(student.settings, lm=str(tmp_path / "lm"), encoder=str(tmp_path / "whisper"))
    report = dry_run(
        settings, settings.lm, Strategy(n_gpus=1, sharding=Sharding.DDP, seq_len=64, response_len=16)
    )
    trainable = sum(p.numel() for _, p in student.trainable_parameters())
    assert report.trainable_params == trainable
    assert report.part(PROJECTOR).params == sum(
        p.numel() for p in student.projector.parameters() if p.requires_grad
    )
    whisper_params = sum(
        p.numel() for p in posterior_whisper.parameters()
    )  # encoder + decoder, tied head once
    assert report.part(AUDIO_ENCODER).params == whisper_params
    assert report.part(LM).trainable > 0


def test_the_cascade_reads_the_asr_checks_decodes_from_the_cache(
    prepared: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmkd.eval.runner import _seed_from_cache
    from cmkd.eval.suites import _items_from_manifest

    root: Path = prepared["root"]
    items = _items_from_manifest(root / "heldout.jsonl", root)
    recogniser = prepared["backends"].make_posterior(prepared["features"])
    _seed_from_cache(recogniser, items, root, max_seconds=60.0)
    decoded: list[int] = []
    monkeypatch.setattr(
        posterior_asr, "posterior_features", lambda audios, *a, **k: decoded.append(len(audios))
    )
    clips = [(item, voice, clip) for item in items for voice, clip in item.clips().items()]
    assert clips
    transcripts = recogniser.transcribe([load_audio(item.clip_path(voice)) for item, voice, _ in clips])
    assert decoded == []  # nothing decoded again
    assert transcripts == [clip.transcript for _, _, clip in clips]
