"""Audio IO, TTS backends and batch synthesis, and the ASR round-trip check.

The real engines (hibari, espeak-ng) run here on a few short sentences: they take well under a second each, and
faking them would miss the things that break (sample rates, voices, determinism across worker processes).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import soundfile as sf

from cmkd.data import audio as audio_module
from cmkd.data.asr_check import (
    ASRCheckResult,
    corpus_wer,
    normalise_for_wer,
    round_trip_check,
    word_error_rate,
)
from cmkd.data.audio import decode_audio_bytes, duration_seconds, load_audio, write_flac
from cmkd.data.records import check_relative_audio_path
from cmkd.data.tts import CommandBackend, EspeakBackend, TTSJob, clip_relpath, make_backend, synthesize_many
from cmkd.errors import UserError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _sine(seconds: float, sr: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    time = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * time)).astype(np.float32)


def _peak_hz(audio: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(audio.size, 1 / sr)[int(np.argmax(spectrum))])


# ---------------------------------------------------------------------------------------------------------------
# audio.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (lambda path: None, "not found"),
        (lambda path: path.write_bytes(b""), "empty"),
        (lambda path: path.write_bytes(b"RIFF\x00\x01garbage" * 20), "cannot decode"),
        (
            lambda path: sf.write(path, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT"),
            "NaN",
        ),
        (
            lambda path: sf.write(path, np.array([0.1, np.inf], np.float32), 16000, subtype="FLOAT"),
            "infinite",
        ),
        (lambda path: sf.write(path, np.zeros(0, np.float32), 16000), "no samples"),
    ],
    ids=["missing", "zero-length", "corrupt", "nan", "inf", "no-samples"],
)
def test_load_audio_refuses_bad_files_naming_them(
    tmp_path: Path, make_file: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "clip.wav"
    make_file(path)
    with pytest.raises(UserError, match=message) as raised:
        load_audio(path)
    assert str(path) in str(raised.value)


def test_load_audio_refuses_too_long_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, _sine(2.0, 16000), 16000)
    with pytest.raises(UserError, match=r"2\.0 s long.*1 s limit"):
        load_audio(path, max_seconds=1.0)
    assert load_audio(path, max_seconds=3.0).size == 32000


def test_stereo_is_downmixed_and_48k_is_resampled(tmp_path: Path) -> None:
    left = _sine(1.0, 48000, freq=440.0)
    path = tmp_path / "stereo48k.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 48000)
    mono = load_audio(path)
    assert mono.dtype == np.float32 and mono.ndim == 1 and mono.size == 16000
    assert abs(_peak_hz(mono, 16000) - 440.0) < 2.0
    assert np.max(np.abs(mono)) == pytest.approx(0.25, abs=0.02)  # (0.5 + 0) / 2


def test_8bit_unsigned_pcm_loads(tmp_path: Path) -> None:
    path = tmp_path / "u8.wav"
    sf.write(path, _sine(0.5, 8000, freq=300.0), 8000, subtype="PCM_U8")
    mono = load_audio(path)
    assert mono.size == 8000 and np.isfinite(mono).all()
    assert abs(_peak_hz(mono, 16000) - 300.0) < 3.0
    assert 0.4 < np.max(np.abs(mono)) < 0.6


def test_decode_bytes_matches_file_and_names_the_source(tmp_path: Path) -> None:
    path = tmp_path / "clip.flac"
    write_flac(path, _sine(0.3, 24000), 24000)
    np.testing.assert_array_equal(decode_audio_bytes(path.read_bytes()), load_audio(path))
    with pytest.raises(UserError, match="item7/speech.audio: audio bytes are empty"):
        decode_audio_bytes(b"", name="item7/speech.audio")
    with pytest.raises(UserError, match="item7: cannot decode"):
        decode_audio_bytes(b"not audio at all" * 10, name="item7")


def test_write_flac_round_trips_and_reports_duration(tmp_path: Path) -> None:
    path = write_flac(tmp_path / "sub" / "a.flac", _sine(1.25, 16000) * 3.0, 16000)  # clipped, not wrapped
    assert sf.info(str(path)).format == "FLAC" and duration_seconds(path) == pytest.approx(1.25)
    assert np.max(np.abs(load_audio(path))) <= 1.0
    with pytest.raises(UserError, match="NaN"):
        write_flac(tmp_path / "b.flac", np.array([np.nan], np.float32), 16000)


def test_write_flac_failure_mid_write_leaves_no_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_half_then_fail(handle: BinaryIO, data: np.ndarray, samplerate: int, **kwargs: object) -> None:
        handle.write(b"fLaC" + b"\x00" * 100)  # some bytes reach the temp file
        raise OSError("disk full")

    fresh = tmp_path / "fresh.flac"
    existing = write_flac(tmp_path / "existing.flac", _sine(0.2, 16000), 16000)
    before = existing.read_bytes()
    monkeypatch.setattr(audio_module.sf, "write", write_half_then_fail)
    for target in (fresh, existing):
        with pytest.raises(OSError, match="disk full"):
            write_flac(target, _sine(0.2, 16000), 16000)
    assert not fresh.exists()
    assert existing.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.flac"]  # no temp files left behind


# ---------------------------------------------------------------------------------------------------------------
# tts backends
# ---------------------------------------------------------------------------------------------------------------


def test_hibari_is_deterministic_and_makes_plausible_16k_flac(tmp_path: Path) -> None:
    backend = make_backend("hibari")
    assert "heart" in backend.voices()
    first, sr = backend.synthesize("What is the capital of France?", "heart")
    again, _ = backend.synthesize("What is the capital of France?", "heart")
    assert sr == 24000 and np.array_equal(first, again)
    [result] = synthesize_many(
        [TTSJob("q1", "What is the capital of France?", "hibari", "heart", tmp_path / "q1.flac")],
        progress=False,
    )
    assert result.error is None and result.path is not None
    assert sf.info(str(result.path)).samplerate == 16000 and sf.info(str(result.path)).channels == 1
    assert 1.0 < result.seconds < 5.0 and result.seconds == pytest.approx(duration_seconds(result.path))


def test_hibari_refuses_unknown_and_uncached_voices() -> None:
    backend = make_backend("hibari")
    with pytest.raises(UserError, match="unknown"):
        backend.synthesize("Hello.", "nobody")
    missing = [voice for voice in ("emma", "fenrir", "fable", "kore") if voice not in backend.voices()]
    if missing:
        with pytest.raises(UserError, match="does not download"):
            backend.synthesize("Hello.", missing[0])


@needs_espeak
def test_espeak_voice_variants_differ_and_unknown_variants_are_refused() -> None:
    backend = make_backend("espeak")
    assert {"en-us", "en-gb", "en-us+m3", "en-gb+f2"} <= set(backend.voices())
    clips = {
        voice: backend.synthesize("Which planet is the largest?", voice)
        for voice in ("en-us", "en-us+m3", "en-gb+f2")
    }
    assert all(sr == 22050 and 0.8 < audio.size / sr < 4.0 for audio, sr in clips.values())
    arrays = [audio for audio, _ in clips.values()]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert arrays[i].shape != arrays[j].shape or not np.array_equal(arrays[i], arrays[j])
    with pytest.raises(UserError, match="not installed"):
        backend.synthesize("Hello.", "en-us+nosuchvariant")
    with pytest.raises(RuntimeError, match="espeak-ng exited"):
        backend.synthesize("Hello.", "xx-nolanguage")


def test_espeak_missing_gives_install_hint() -> None:
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        EspeakBackend(executable="no-such-espeak-ng-binary")


_SINE_SCRIPT = """
import sys, numpy as np, soundfile as sf
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
text = args["--text"] if "--text" in args else sys.stdin.read()
open(args["--log"], "w", encoding="utf-8").write(text)
seconds = 0.05 * len(text)
t = np.arange(int(seconds * 22050)) / 22050
sf.write(args["--out"], (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
"""


def test_command_backend_passes_text_as_one_argument_never_through_a_shell(tmp_path: Path) -> None:
    script = tmp_path / "sine_tts.py"
    script.write_text(_SINE_SCRIPT)
    log = tmp_path / "received.txt"
    nasty = 'It\'s "quoted"; $(touch pwned) `touch pwned2` && echo {out} | cat'
    backend = make_backend("mytts", f"{sys.executable} {script} --text {{text}} --out {{out}} --log {log}")
    audio, sr = backend.synthesize(nasty, "any")
    assert log.read_text(encoding="utf-8") == nasty
    assert sr == 22050 and audio.size == int(0.05 * len(nasty) * 22050)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    stdin_backend = CommandBackend(f"{sys.executable} {script} --out {{out}} --log {log}")
    stdin_backend.synthesize("Text on stdin.", "")
    assert log.read_text(encoding="utf-8") == "Text on stdin."


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("", "needs a command template"),
        ("tts --text {text}", "needs an {out} placeholder"),
        ("tts --text {text} | sox - {out}", "without a shell"),
        ("no-such-tts-program --out {out}", "not found"),
        ("tts --text 'unclosed {out}", "cannot parse"),
    ],
)
def test_command_backend_refuses_bad_templates(command: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_backend("command", command) if command else make_backend("command")


# ---------------------------------------------------------------------------------------------------------------
# synthesize_many
# ---------------------------------------------------------------------------------------------------------------

_SENTENCES = ["What is the capital of Peru?", "Name a primary colour.", "How many legs does a spider have?"]


def _jobs(out_dir: Path) -> list[TTSJob]:
    backends = [("hibari", "heart")] + ([("espeak", "en-us+m3")] if shutil.which("espeak-ng") else [])
    return [
        TTSJob(f"q{i}", text, name, voice, out_dir / f"q{i}-{name}.flac")
        for i, text in enumerate(_SENTENCES)
        for name, voice in backends
    ]


def test_two_workers_write_the_same_files_as_one(tmp_path: Path) -> None:
    serial = synthesize_many(_jobs(tmp_path / "serial"), workers=1, progress=False)
    parallel = synthesize_many(_jobs(tmp_path / "parallel"), workers=2, progress=False)
    assert [r.error for r in serial + parallel] == [None] * (2 * len(serial))
    assert [(r.item_id, r.voice) for r in serial] == [(r.item_id, r.voice) for r in parallel]
    for one, two in zip(serial, parallel, strict=True):
        assert one.path is not None and two.path is not None
        assert one.path.read_bytes() == two.path.read_bytes()


def test_resume_skips_valid_outputs_and_redoes_missing_or_broken_ones(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path)[:3]
    first = synthesize_many(jobs, progress=False)
    mtimes = [os.stat(r.path).st_mtime_ns for r in first if r.path]
    again = synthesize_many(jobs, progress=False)
    assert all(r.reused and r.error is None for r in again)
    assert [os.stat(r.path).st_mtime_ns for r in again if r.path] == mtimes
    jobs[0].out_path.unlink()
    jobs[1].out_path.write_bytes(jobs[1].out_path.read_bytes()[:200])  # a truncated file from a killed run
    third = synthesize_many(jobs, progress=False)
    assert [r.reused for r in third] == [False, False, True]
    assert all(r.error is None and load_audio(r.path).size > 0 for r in third if r.path)


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_jobs_are_reported_not_raised(tmp_path: Path, workers: int) -> None:
    good = TTSJob("ok", "Hello there.", "hibari", "heart", tmp_path / "ok.flac")
    jobs = [
        TTSJob("bad-backend", "Hello.", "nosuchengine", "", tmp_path / "a.flac"),
        good,
        TTSJob("no-phonemes", "-", "hibari", "heart", tmp_path / "b.flac"),
        TTSJob("empty", "  ", "espeak", "en-us", tmp_path / "d.flac"),
        TTSJob("dup", "Hello.", "hibari", "heart", tmp_path / "ok.flac"),
        TTSJob(
            "bad-command", "Hi.", "mytts", "", tmp_path / "c.flac", command=f"{sys.executable} -c 1 {{out}}"
        ),
    ]
    results = synthesize_many(jobs, workers=workers, progress=False)
    assert [r.item_id for r in results] == [job.item_id for job in jobs]
    by_id = {r.item_id: r for r in results}
    assert by_id["ok"].error is None and good.out_path.is_file()
    assert "unknown" in (by_id["bad-backend"].error or "")
    assert "nothing to speak" in (by_id["no-phonemes"].error or "")
    assert "empty text" in (by_id["empty"].error or "")
    assert "also the output of item 'ok'" in (by_id["dup"].error or "")
    assert "wrote no audio" in (by_id["bad-command"].error or "")
    assert all(r.path is None for r in results if r.error)
    reject = by_id["bad-backend"].to_reject()
    assert (reject.item_id, reject.field, reject.reason) == ("bad-backend", "speech.audio", "tts failed")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="workers"):
        synthesize_many(jobs, workers=0)


def test_clip_relpath_is_safe_and_changes_with_the_text() -> None:
    path = clip_relpath("../openorca/7: x", "espeak", "en-us+m3", "What is two plus two?")
    check_relative_audio_path("item", path)  # a valid manifest `speech.audio` value
    assert path.startswith("espeak/en-us+m3/openorca_7_x-") and path.endswith(".flac")
    assert path == clip_relpath("../openorca/7: x", "espeak", "en-us+m3", "What is two plus two?")
    assert path != clip_relpath("../openorca/7: x", "espeak", "en-us+m3", "What is two plus three?")
    assert clip_relpath("a/b", "hibari", "", "t") != clip_relpath("a_b", "hibari", "", "t")


# ---------------------------------------------------------------------------------------------------------------
# asr_check.py
# ---------------------------------------------------------------------------------------------------------------


def test_normalise_for_wer_spells_numbers_like_the_prompts() -> None:
    assert normalise_for_wer("What's 42 + 3?") == "whats forty two plus three"
    assert normalise_for_wer("What is forty-two plus three?") == "what is forty two plus three"
    assert normalise_for_wer("Mr. Lee paid $3.50 on the 2nd") == normalise_for_wer(
        "Mister Lee paid three dollars and fifty cents on the second"
    )
    assert normalise_for_wer("  HELLO,   World!! ") == "hello world"
    # text the prompt speller refuses (a URL) still gets its digits spelled
    assert normalise_for_wer("See www.example.com in 1984, page 3") == (
        "see www example com in nineteen eighty four page three"
    )


def test_wer_maths() -> None:
    assert word_error_rate("the cat sat down", "the cat sat down.") == 0.0
    assert word_error_rate("the cat sat down", "the dog sat down") == pytest.approx(0.25)
    assert word_error_rate("the cat sat down", "the cat sat right down") == pytest.approx(0.25)
    assert word_error_rate("the cat", "") == 1.0
    assert word_error_rate("", "") == 0.0 and word_error_rate("...", "noise") == 1.0
    # corpus WER weights by reference length: (1 + 0) edits / (4 + 2) words
    assert corpus_wer(
        ["the cat sat down", "hello there"], ["the dog sat down", "hello there"]
    ) == pytest.approx(1 / 6)


class _ListASR:
    """Returns queued transcripts in call order; fails any batch that holds a clip of the poisoned length."""

    def __init__(self, transcripts: list[str], poison_samples: int = -1) -> None:
        self.queue = list(transcripts)
        self.poison_samples = poison_samples
        self.batch_sizes: list[int] = []

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]:
        self.batch_sizes.append(len(audio_16k))
        if any(clip.size == self.poison_samples for clip in audio_16k):
            raise RuntimeError("decoder blew up")
        return [self.queue.pop(0) for _ in audio_16k]


def test_round_trip_check_rejects_over_threshold_and_unreadable_clips(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(write_flac(tmp_path / f"c{i}.flac", _sine(0.1 * (i + 1), 16000), 16000))
    clips = [
        ("a", "heart", paths[0], "What is two plus two?"),
        ("b", "heart", paths[1], "Name a red fruit."),
        ("c", "en-us", tmp_path / "missing.flac", "Anything."),
        ("d", "en-us", paths[3], "Tell me a joke."),
    ]
    asr = _ListASR(["what is 2 + 2", "name a green fruit", "tell me a joke"])
    results = round_trip_check(clips, asr, max_wer=0.2, batch_size=2, progress=False)
    assert asr.batch_sizes == [2, 1]
    assert [r.item_id for r in results] == ["a", "b", "c", "d"]
    assert results[0] == ASRCheckResult("a", "heart", "what is 2 + 2", 0.0, False)
    assert results[1].wer == pytest.approx(0.25) and results[1].rejected
    assert results[2].rejected and results[2].wer is None and "not found" in (results[2].error or "")
    assert results[3].wer == 0.0 and not results[3].rejected
    assert results[1].to_reject(0.2).reason == "asr wer too high"
    assert results[2].to_reject(0.2).reason == "asr check failed"


def test_round_trip_check_isolates_a_clip_the_asr_fails_on(tmp_path: Path) -> None:
    paths = [write_flac(tmp_path / f"c{i}.flac", _sine(0.1 * (i + 1), 16000), 16000) for i in range(3)]
    clips = [(f"i{i}", "v", path, "hello world") for i, path in enumerate(paths)]
    asr = _ListASR(["hello world", "hello world"], poison_samples=3200)  # the 0.2 s clip
    results = round_trip_check(clips, asr, max_wer=0.5, batch_size=3, progress=False)
    assert [r.rejected for r in results] == [False, True, False]
    assert "decoder blew up" in (results[1].error or "")
    with pytest.raises(UserError, match="max_wer"):
        round_trip_check(clips, asr, max_wer=float("nan"))


@pytest.mark.slow
def test_real_whisper_ct2_transcribes_hibari_speech(tmp_path: Path) -> None:
    whisper_ct2 = pytest.importorskip(
        "cmkd.models.whisper_ct2", reason="cmkd.models.whisper_ct2 cannot be imported"
    )
    if not hasattr(whisper_ct2, "transcribe_ct2"):
        pytest.skip("cmkd.models.whisper_ct2.transcribe_ct2 is not implemented yet")
    from cmkd.assets import whisper_ct2_path
    from cmkd.data.asr_check import CT2WhisperASR

    try:
        ct2_dir = whisper_ct2_path(fetch=False)
    except UserError as error:
        pytest.skip(f"Whisper CT2 weights are not in the cache (run `make assets`): {error}")
    text = "What is the capital of France?"
    [clip] = synthesize_many([TTSJob("q", text, "hibari", "heart", tmp_path / "q.flac")], progress=False)
    assert clip.path is not None
    [result] = round_trip_check(
        [("q", "heart", clip.path, text)], CT2WhisperASR(ct2_dir), 0.3, progress=False
    )
    assert result.error is None and not result.rejected, result
