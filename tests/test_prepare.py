"""`cmkd prepare` end to end on tiny models: outputs, no-op re-runs, kill -9 and resume, bad input, shards, caches.

The fakes keep the tests fast and deterministic:
- TTS: the real `command` backend running a stdlib-only script that writes a sine whose length encodes the
  text (`fake_tts_command`), so TTS goes through `synthesize_many` exactly as in production;
- ASR: `FakeASR` reads the text back from the clip length and mumbles quiet clips (high WER -> rejected);
- teacher and encoder: the tiny random Llama and Whisper from conftest (saved to disk for subprocess runs).
Kill points are made deterministic by the fakes themselves: they SIGKILL the prepare process on their N-th call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from cmkd.data.audio import load_audio
from cmkd.data.features import FeatureCache, FeatureSettings, encode_clip, feature_meta
from cmkd.data.jsonl_io import read_jsonl
from cmkd.data.logit_cache import CacheMeta, LogitCacheReader, read_meta
from cmkd.data.prepare import PrepareBackends, run_prepare
from cmkd.data.prepare_work import assign_split, in_shard
from cmkd.data.records import PairedRecord, read_manifest
from cmkd.errors import UserError
from cmkd.models.encoder import WhisperSpeechEncoder
from cmkd.stage_configs import (
    DataSettings,
    PrepareConfig,
    RunSettings,
    SourceSettings,
    TeacherSettings,
    TTSSettings,
    TTSVoice,
)

TESTS_DIR = Path(__file__).parent
QUESTIONS = [
    ("q01", "What is the capital of France?", "Paris"),
    ("q02", "What color is the sky?", "blue"),
    ("q03", "What is two plus two?", "four"),
    ("q04", "What sound does a cat make?", "meow"),
    ("q05", "Is a whale a fish?", "no"),
    ("q06", "What is the opposite of hot?", "cold"),
    ("q07", "Where is Zanzibar?", "Tanzania"),  # every voice mumbles it: the record keeps no clip
    ("q08", "What is a baby dog called?", "puppy"),
    ("q09", "Name the capital city of Spain.", "Madrid"),
    ("q10", "What does a cow say?", "moo"),
    ("q11", "What is three times four?", "twelve"),
    ("q12", "Repeat after me: happy cats.", "happy cats"),
]
HELDOUT_FRACTION = 0.3
BASE_SAMPLES, STEP_SAMPLES, BUCKETS = 8000, 32, 5000

# ---------------------------------------------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------------------------------------------

FAKE_TTS_SCRIPT = f"""
import math, os, signal, struct, sys, wave, zlib
text, voice, out = sys.argv[1], sys.argv[2], sys.argv[3]
counter = os.environ.get("FAKE_TTS_COUNTER")
if counter:
    with open(counter, "ab") as handle:
        handle.write(b"x")
    calls = os.path.getsize(counter)
    if calls == int(os.environ.get("FAKE_TTS_KILL_AT", "0")):
        os.kill(os.getppid(), signal.SIGKILL)
samples = {BASE_SAMPLES} + {STEP_SAMPLES} * (zlib.crc32(text.encode()) % {BUCKETS})
amplitude = 0.05 if voice == "mumble" else 0.4
frequency = 180.0 if voice == "mumble" else 240.0
frames = b"".join(
    struct.pack("<h", int(amplitude * 32767 * math.sin(2 * math.pi * frequency * i / 16000))) for i in range(samples)
)
with wave.open(out, "wb") as wav:
    wav.setnchannels(1)
    wav.setsampwidth(2)
    wav.setframerate(16000)
    wav.writeframes(frames)
"""


def fake_tts_command(directory: Path) -> str:
    script = directory / "fake_tts.py"
    if not script.exists():
        script.write_text(FAKE_TTS_SCRIPT, encoding="utf-8")
    return f"{sys.executable} -I {script} {{text}} {{voice}} {{out}}"


def clip_samples(text: str) -> int:
    return BASE_SAMPLES + STEP_SAMPLES * (zlib.crc32(text.encode()) % BUCKETS)


class FakeASR:
    """Hears the text back from the clip length; quiet clips and Zanzibar come out as one word (WER > 0.5)."""

    def __init__(self, texts: list[str], kill_at: int = 0) -> None:
        self.by_length = {clip_samples(text): text for text in [*texts, "Testing."]}
        assert len(self.by_length) == len(texts) + 1, "two fake clips have the same length; change a question"
        self.calls = 0
        self.kill_at = kill_at

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]:
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        texts = []
        for audio in audio_16k:
            text = self.by_length.get(len(audio), "")
            mumbled = float(np.abs(audio).max()) < 0.2 or "Zanzibar" in text
            texts.append(text.split()[0] if mumbled and text else text)
        return texts


def write_source(directory: Path, questions: list[tuple[str, str, str]] = QUESTIONS) -> Path:
    path = directory / "questions.jsonl"
    lines = [json.dumps({"id": i, "question": q, "answer": a}) for i, q, a in questions]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_config(root: Path, source: Path, teacher_model: str = "tiny", **teacher: Any) -> PrepareConfig:
    command = fake_tts_command(root.parent)
    settings: dict[str, Any] = {
        "model": teacher_model,
        "max_new_tokens": 6,
        "batch_size": 4,
        "logits_top_k": 8,
    }
    settings |= teacher
    return PrepareConfig(
        run=RunSettings(out_dir=root, threads=1),
        source=SourceSettings(kind="jsonl", path=str(source)),
        data=DataSettings(root=root),
        teacher=TeacherSettings(**settings),
        tts=TTSSettings(
            voices=[
                TTSVoice("command", "clear", "all", command),
                TTSVoice("command", "mumble", "heldout", command),
            ],
            workers=1,
            max_wer=0.5,
        ),
    )


class Calls:
    def __init__(self) -> None:
        self.teacher_loads = self.generate = self.asr_builds = self.encoder_loads = 0


def tiny_backends(lm: Any, tokenizer: Any, whisper: Any, calls: Calls) -> PrepareBackends:
    original_generate = lm.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        calls.generate += 1
        return original_generate(*args, **kwargs)

    lm.generate = generate

    def load_teacher(cfg: PrepareConfig) -> tuple[Any, Any]:
        calls.teacher_loads += 1
        return lm, tokenizer

    def make_asr() -> FakeASR:
        calls.asr_builds += 1
        return FakeASR([q for _, q, _ in QUESTIONS])

    def load_encoder(name: str) -> WhisperSpeechEncoder:
        calls.encoder_loads += 1
        return WhisperSpeechEncoder.from_model(whisper)

    return PrepareBackends(
        load_teacher=load_teacher, make_asr=make_asr, asr_name="fake", load_encoder=load_encoder
    )


def tts_calls(directory: Path) -> int:
    counter = directory / "tts_calls"
    return counter.stat().st_size if counter.exists() else 0


@pytest.fixture
def tts_counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FAKE_TTS_COUNTER", str(tmp_path / "tts_calls"))
    return tmp_path


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = [row for _, row in read_jsonl(path)]
    assert all(isinstance(row, dict) for row in rows), f"{path} has damaged lines"
    return [row for row in rows if isinstance(row, dict)]


def output_files(root: Path) -> dict[str, bytes]:
    """Every output file (manifests, rejects, audio, caches); not the work logs, stats or hidden temp files."""
    skip = ("work/", "stats.", "config.yaml")
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and not str(path.relative_to(root)).startswith(skip)
        and not path.name.startswith(".")
    }


# ---------------------------------------------------------------------------------------------------------------
# End to end, in process
# ---------------------------------------------------------------------------------------------------------------


def test_end_to_end_then_rerun_is_a_no_op(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    root = tmp_path / "data"
    cfg = make_config(root, write_source(tmp_path))
    calls = Calls()
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, calls)
    features = FeatureSettings(encoder="tiny")
    stats = run_prepare(
        cfg, root, progress=False, features=features, heldout_fraction=HELDOUT_FRACTION, backends=backends
    )

    train, heldout = read_manifest(root / "train.jsonl"), read_manifest(root / "heldout.jsonl")
    records = train + heldout
    assert train and heldout
    assert [r.id for r in train] == sorted(r.id for r in train)
    rejects = jsonl_rows(root / "rejects.jsonl")
    rejected_ids = {row["item_id"] for row in rejects if row["reason"] == "empty teacher response"}
    assert {r.id for r in records} | rejected_ids == {i for i, _, _ in QUESTIONS}
    for record in records:
        assert record.system == "Answer the question in a few words."
        assert record.teacher_response_ids and record.teacher_truncated is not None
        voices = {clip.voice for clip in record.speech}
        assert "mumble" not in voices  # every mumbled clip failed the round trip
        if record.id == "q07":
            assert record.speech == []  # kept for T→T without any clip
        else:
            assert voices == {"clear"}
            (clip,) = record.speech
            assert clip.wer == 0.0 and clip.audio.startswith("audio/command/clear/")
            assert sf.info(str(root / clip.audio)).samplerate == 16000
    wer_rejects = [row for row in rejects if row["reason"] == "asr wer too high"]
    q07_voices = 2 if any(r.id == "q07" for r in heldout) else 1
    assert (
        len(wer_rejects) == sum(1 for r in heldout if r.id != "q07") + q07_voices
    )  # every mumble + q07's clips

    # Teacher cache: one entry per record, rows along exactly the manifest's response ids.
    meta = read_meta(root / "teacher_logits")
    assert (meta.k, meta.temperature, meta.teacher) == (8, 2.0, "tiny")
    reader = LogitCacheReader(root / "teacher_logits", meta)
    assert sorted(reader.item_ids()) == sorted(r.id for r in records)
    for record in records:
        ids, logprobs = reader.get(record.id)
        assert ids.shape == (len(record.teacher_response_ids or []) + 1, 8)
        assert torch.all(logprobs <= 0)

    # Feature cache: what the online encoder gives for the same clip.
    encoder = WhisperSpeechEncoder.from_model(tiny_whisper)
    cache = FeatureCache(root, expected=feature_meta(encoder, features))
    clip = train[0].speech[0]
    online = encode_clip(encoder, load_audio(root / clip.audio))
    assert torch.equal(cache.get(clip.audio), online)
    assert cache.get(clip.audio).shape == (int(np.ceil(clip_samples(train[0].prompt) / 320)), 64)

    assert stats.counts["train records"] == len(train) and stats.counts["heldout records"] == len(heldout)
    assert stats.counts["records without speech"] == 1
    assert stats.rejects_by_reason["asr wer too high"] == len(wer_rejects)
    assert {v["voice"] for v in stats.voices} == {"command:clear", "command:mumble"}
    assert (root / "stats.md").read_text().startswith("# cmkd prepare")
    assert json.loads((root / "stats.json").read_text())["counts"] == stats.counts

    before = output_files(root)
    first_calls = (
        calls.teacher_loads,
        calls.generate,
        tts_calls(tts_counter),
        calls.asr_builds,
        calls.encoder_loads,
    )
    assert first_calls[0] == 1 and first_calls[1] == 3 and first_calls[3] == 1 and first_calls[4] == 1
    again = run_prepare(
        cfg, root, progress=False, features=features, heldout_fraction=HELDOUT_FRACTION, backends=backends
    )
    assert again.generated == {"teacher": 0, "tts": 0, "asr": 0, "features": 0}
    assert (
        calls.teacher_loads,
        calls.generate,
        tts_calls(tts_counter),
        calls.asr_builds,
        calls.encoder_loads,
    ) == (first_calls)
    assert output_files(root) == before


def test_changed_settings_redo_only_what_they_touch(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    root = tmp_path / "data"
    cfg = make_config(root, write_source(tmp_path))
    calls = Calls()
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, calls)
    run_prepare(cfg, root, progress=False, heldout_fraction=HELDOUT_FRACTION, backends=backends)
    # A stricter WER bar changes verdicts only: nothing is recomputed, the ASR results are reused.
    cfg.tts.max_wer = 0.0
    stats = run_prepare(cfg, root, progress=False, heldout_fraction=HELDOUT_FRACTION, backends=backends)
    assert stats.generated == {"teacher": 0, "tts": 0, "asr": 0, "features": 0}
    # An edited question is regenerated alone (its batch runs again, but only its results are new).
    edited = [(i, q.replace("France", "Italy"), a) for i, q, a in QUESTIONS]
    write_source(tmp_path, edited)
    stats = run_prepare(cfg, root, progress=False, heldout_fraction=HELDOUT_FRACTION, backends=backends)
    assert stats.generated["teacher"] == 1 and stats.generated["tts"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Kill -9 and resume, in child processes
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_CHILD = """
import json, sys
from pathlib import Path
spec = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, spec["tests_dir"])
import test_prepare as t
from cmkd.data.features import FeatureSettings
from cmkd.data.prepare import PrepareBackends, run_prepare
root = Path(spec["root"])
cfg = t.make_config(root, Path(spec["source"]), teacher_model=spec["lm_dir"])
backends = PrepareBackends(make_asr=lambda: t.FakeASR([q for _, q, _ in t.QUESTIONS]), asr_name="fake")
features = FeatureSettings(encoder=spec["whisper_dir"])
run_prepare(cfg, root, progress=False, features=features, heldout_fraction=t.HELDOUT_FRACTION, backends=backends)
"""


def _run_fresh_interpreter(tmp_path: Path, root: Path, models: dict[str, str]) -> None:
    """The whole run in a new Python process loading the saved tiny models from disk: no state shared with us."""
    spec, child = tmp_path / "spec.json", tmp_path / "reference_child.py"
    spec.write_text(json.dumps({"tests_dir": str(TESTS_DIR), "root": str(root),
                                "source": str(tmp_path / "questions.jsonl"), **models}))  # fmt: skip
    child.write_text(REFERENCE_CHILD, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FAKE_TTS_COUNTER", None)
    done = subprocess.run([sys.executable, str(child), str(spec)], env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]


def _killing(function: Any, at: int) -> Any:
    """`function` that SIGKILLs its own process right after its `at`-th call returns."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


def _forked_prepare(
    cfg: PrepareConfig, features: FeatureSettings, make_backends: Any, kill: str, counter: Path
) -> int:
    """run_prepare in a forked child that kills itself at `kill` ('stage:n'); returns -9 when it did, else 0.

    Forking skips the ~15 s of imports a fresh interpreter pays; the SIGKILL is as real as it gets.
    """
    import cmkd.data.prepare_assemble as assemble
    import cmkd.data.prepare_stages as stages

    stage, _, at_text = kill.partition(":")
    at = int(at_text or 0)
    counter.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: arm the kill point, run, and leave without running pytest's teardown
        code = 1
        try:
            stages.TTS_CHUNK = stages.ASR_CHUNK = stages.FEATURES_CHUNK = 4  # several log appends per stage
            backends = make_backends(kill_asr_at=at if stage == "asr" else 0)
            if stage == "teacher":  # inside a batch: after `generate`, before its results are written
                load = backends.load_teacher

                def load_and_arm(config: PrepareConfig) -> tuple[Any, Any]:
                    model, tokenizer = load(config)
                    model.generate = _killing(model.generate, at)
                    return model, tokenizer

                backends.load_teacher = load_and_arm
            if stage == "topk":  # a top-k shard is on disk but its batch is not in the work log
                setattr(stages.LogitCacheWriter, "write", _killing(stages.LogitCacheWriter.write, at))  # noqa: B010
            if stage == "tts":  # the fake TTS command kills its parent on its `at`-th call
                os.environ["FAKE_TTS_KILL_AT"] = str(at)
            if stage == "features":  # a feature file is written but not yet logged
                stages.write_clip_features = _killing(stages.write_clip_features, at)
            if stage == "manifest":  # between train.jsonl and heldout.jsonl
                assemble.write_manifest = _killing(assemble.write_manifest, at)
            run_prepare(cfg, cfg.data.root, progress=False, features=features,
                        heldout_fraction=HELDOUT_FRACTION, backends=backends)  # fmt: skip
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _ok_rows(root: Path) -> dict[str, int]:
    counts = {}
    for stage in ("teacher", "tts", "asr", "features"):
        path = root / "work" / "shard-0-of-1" / f"{stage}.jsonl"
        rows = jsonl_rows(path) if path.exists() else []
        counts[stage] = sum(1 for row in rows if isinstance(row, dict) and row.get("ok"))
    return counts


def test_kill_at_any_stage_then_resume_gives_identical_outputs(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    tiny_lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    tiny_whisper.save_pretrained(tmp_path / "whisper")
    models = {"lm_dir": str(tmp_path / "lm"), "whisper_dir": str(tmp_path / "whisper")}
    source = write_source(tmp_path)
    _run_fresh_interpreter(tmp_path, tmp_path / "reference", models)
    reference = output_files(tmp_path / "reference")
    assert "train.jsonl" in reference and "teacher_logits/meta.json" in reference

    root = tmp_path / "killed"
    cfg = make_config(root, source, teacher_model=models["lm_dir"])
    features = FeatureSettings(
        encoder=models["whisper_dir"]
    )  # the names enter the caches' meta, so they match

    def make_backends(kill_asr_at: int) -> PrepareBackends:
        backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, Calls())
        backends.make_asr = lambda: FakeASR([q for _, q, _ in QUESTIONS], kill_at=kill_asr_at)
        return backends

    # One data root killed again and again, each time at a later point, then finished by a plain re-run.
    # (kill point, ok rows per stage expected in the work logs right after the kill)
    plan: list[tuple[str, dict[str, int | None]]] = [
        ("teacher:3", {"teacher": 8, "tts": 0}),  # 2 of 3 batches logged, the third died in flight
        ("topk:1", {"teacher": 8, "tts": 0}),  # batch 3's top-k shard written, its log line not
        ("tts:9", {"teacher": 12, "tts": 4}),  # 2 voice probes + 4 logged clips + 3 unlogged clips
        ("asr:2", {"tts": 17, "asr": 4}),
        ("features:6", {"asr": 17, "features": 4}),
        ("manifest:1", {"features": None}),
    ]
    for kill, expected in plan:
        assert (
            _forked_prepare(cfg, features, make_backends, kill, tts_counter / "tts_calls") == -signal.SIGKILL
        ), kill
        rows = _ok_rows(root)
        assert {stage: rows[stage] for stage in expected if expected[stage] is not None} == {
            stage: count for stage, count in expected.items() if count is not None
        }, (kill, rows)
    assert (root / "train.jsonl").exists() and not (root / "heldout.jsonl").exists()
    assert _forked_prepare(cfg, features, make_backends, "none", tts_counter / "tts_calls") == 0
    assert output_files(root) == reference
    for name in ("train.jsonl", "heldout.jsonl"):
        ids = [r.id for r in read_manifest(root / name)]
        assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------------------------
# Bad input, shards, cache mismatch, small pieces
# ---------------------------------------------------------------------------------------------------------------


def test_bad_input_lands_in_rejects_and_good_items_finish(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    source = write_source(tmp_path, QUESTIONS[:4])
    with source.open("ab") as handle:
        handle.write(b'{"id": "broken", "question": \n')
        handle.write(b'{"id": "empty", "question": "   ", "answer": "x"}\n')
        handle.write(b'{"id": "latin1", "question": "caf\xe9?", "answer": "x"}\n')
        handle.write(b'{"id": "nofield", "answer": "x"}\n')
        handle.write(json.dumps({"id": "huge", "question": "why " * 25_000, "answer": "x"}).encode() + b"\n")
        handle.write(b'{"id": "url", "question": "Open https://example.com now", "answer": "x"}\n')
    root = tmp_path / "data"
    cfg = make_config(root, source)
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, Calls())
    run_prepare(cfg, root, progress=False, heldout_fraction=0.0, backends=backends)
    rejects = {(row["item_id"], row["reason"]) for row in jsonl_rows(root / "rejects.jsonl")}
    assert ("questions.jsonl:5", "malformed JSON") in rejects
    assert ("empty", "empty text") in rejects
    assert ("questions.jsonl:7", "not UTF-8") in rejects
    assert ("nofield", "missing field") in rejects
    assert ("huge", "text too long") in rejects
    assert any(item == "url" for item, _ in rejects)
    kept = {r.id for r in read_manifest(root / "train.jsonl")}
    assert kept | {i for i, r in rejects if r == "empty teacher response"} == {"q01", "q02", "q03", "q04"}


def _wav_bytes(seconds: float, frequency: float) -> bytes:
    import io

    buffer = io.BytesIO()
    time = np.arange(int(seconds * 22050)) / 22050
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * frequency * time), 22050, format="WAV")
    return buffer.getvalue()


def test_voicebench_keeps_its_audio_and_rejects_corrupt_clips(
    tmp_path: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    subset = tmp_path / "vb" / "alpacaeval"
    subset.mkdir(parents=True)
    rows = [
        {"prompt": "Tell me a joke.", "audio": {"bytes": _wav_bytes(1.0, 200), "path": "a.wav"}},
        {"prompt": "Explain rain.", "audio": {"bytes": b"RIFF not audio at all", "path": "b.wav"}},
        {"prompt": "Name a fruit.", "audio": {"bytes": _wav_bytes(1.5, 300), "path": "c.wav"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), subset / "test-00000-of-00001.parquet")
    root = tmp_path / "data"
    cfg = make_config(root, tmp_path / "unused")
    cfg.source = SourceSettings(kind="voicebench", path=str(tmp_path / "vb"))
    calls = Calls()
    stats = run_prepare(
        cfg, root, progress=False, backends=tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, calls)
    )
    rejects = jsonl_rows(root / "rejects.jsonl")
    assert {
        "item_id": "voicebench/alpacaeval/test/000001",
        "field": "audio",
        "reason": "corrupt audio",
    }.items() <= (rejects[0].items())
    heldout = read_manifest(root / "heldout.jsonl")
    assert not (root / "train.jsonl").read_bytes()  # VoiceBench is all held out
    cache = FeatureCache(root)
    for record in heldout:
        (clip,) = record.speech
        assert clip.source == "google_tts" and clip.audio.startswith("audio/voicebench/")
        assert cache.get(clip.audio).shape[1] == 64
    assert calls.asr_builds == 0 and stats.generated["tts"] == 0


def test_shards_then_merge_equal_one_unsharded_run(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    source = write_source(tmp_path)
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, Calls())
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    run_prepare(
        make_config(whole, source),
        whole,
        progress=False,
        heldout_fraction=HELDOUT_FRACTION,
        backends=backends,
    )
    cfg = make_config(sharded, source)
    cfg.shard = "1/2"
    stats = run_prepare(cfg, sharded, progress=False, heldout_fraction=HELDOUT_FRACTION, backends=backends)
    assert not stats.manifests_written and not (sharded / "train.jsonl").exists()
    cfg.shard = "0/1"
    with pytest.raises(UserError, match="--merge: not every item"):
        run_prepare(
            cfg, sharded, progress=False, merge=True, heldout_fraction=HELDOUT_FRACTION, backends=backends
        )
    cfg.shard = "0/2"
    run_prepare(cfg, sharded, progress=False, heldout_fraction=HELDOUT_FRACTION, backends=backends)
    cfg.shard = "0/1"
    merged = run_prepare(
        cfg, sharded, progress=False, merge=True, heldout_fraction=HELDOUT_FRACTION, backends=backends
    )
    assert merged.generated == {"teacher": 0, "tts": 0, "asr": 0, "features": 0}
    for name in ("train.jsonl", "heldout.jsonl", "rejects.jsonl"):
        assert (sharded / name).read_bytes() == (whole / name).read_bytes()


def test_mismatched_logit_cache_is_refused(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    root = tmp_path / "data"
    source = write_source(tmp_path, QUESTIONS[:3])
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, Calls())
    run_prepare(make_config(root, source), root, progress=False, backends=backends)
    made = read_meta(root / "teacher_logits")
    with pytest.raises(UserError, match="made with k=8, this run has 4"):
        run_prepare(make_config(root, source, logits_top_k=4), root, progress=False, backends=backends)
    for wrong in ({"tokenizer_hash": "0" * 16}, {"temperature": 1.0}, {"teacher": "other"}):
        expected = CacheMeta(**{**made.__dict__, **wrong})
        with pytest.raises(UserError, match="logit cache"):
            LogitCacheReader(root / "teacher_logits", expected)
    cfg = make_config(root, source, logits_top_k=4)
    cfg.run.overwrite = True
    run_prepare(cfg, root, progress=False, backends=backends)
    assert read_meta(root / "teacher_logits").k == 4
    assert LogitCacheReader(root / "teacher_logits").get("q01")[0].shape[1] == 4


def test_feature_cache_refuses_another_encoder(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    root = tmp_path / "data"
    backends = tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, Calls())
    run_prepare(
        make_config(root, write_source(tmp_path, QUESTIONS[:2])), root, progress=False, backends=backends
    )
    other = WhisperSpeechEncoder.from_model(tiny_whisper)
    with torch.no_grad():
        other.whisper.layer_norm.weight.add_(1.0)
    with pytest.raises(UserError, match="weights_hash"):
        FeatureCache(root, expected=feature_meta(other, FeatureSettings()))


def test_split_and_shard_assignment_are_stable_partitions() -> None:
    records = [PairedRecord(id=f"item-{n}", prompt="Hi?") for n in range(2000)]
    heldout = [r for r in records if assign_split(r, 0.1) == "heldout"]
    assert 150 < len(heldout) < 250
    assert [assign_split(r, 0.1) for r in records] == [assign_split(r, 0.1) for r in records]
    demo = PairedRecord(id="d", prompt="Hi?", meta={"split": "heldout"})
    assert assign_split(demo, 0.0) == "heldout"
    owners = [[i for i in range(4) if in_shard(r.id, i, 4)] for r in records]
    assert all(len(owner) == 1 for owner in owners)
    assert all(in_shard(r.id, 0, 1) for r in records)


def test_settings_problems_are_user_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    cfg = make_config(root, write_source(tmp_path))
    cfg.tts.voices.append(TTSVoice("command", "clear", "train", cfg.tts.voices[0].command))
    with pytest.raises(UserError, match="same backend/voice"):
        run_prepare(cfg, root, progress=False)
    cfg = make_config(root, write_source(tmp_path))
    cfg.tts.voices[0].split = "dev"
    with pytest.raises(UserError, match="split"):
        run_prepare(cfg, root, progress=False)
    cfg = make_config(root, write_source(tmp_path))
    cfg.shard = "1/2"
    with pytest.raises(UserError, match="--merge"):
        run_prepare(cfg, root, progress=False, merge=True)


# ---------------------------------------------------------------------------------------------------------------
# The real embedded models (slow)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_models_prepare_a_few_questions(tmp_path: Path) -> None:
    """SmolLM2 answers, hibari and espeak speak, CT2 Whisper checks, the real encoder caches: 4 held-out items."""
    from cmkd.config import load_config

    questions = [
        ("r1", "What is the capital of France?", "Paris"),
        ("r2", "What color is a banana?", "yellow"),
        ("r3", "What is the opposite of big?", "small"),
        ("r4", "What sound does a dog make?", "woof"),
    ]
    source = write_source(tmp_path, questions)
    root = tmp_path / "data"
    overrides = [f"data.root={root}", f"run.out_dir={root}", "source.kind=jsonl", f"source.path={source}"]
    cfg = load_config(PrepareConfig, TESTS_DIR.parent / "configs" / "demo.yaml", overrides)
    stats = run_prepare(cfg, root, progress=False, heldout_fraction=0.999)  # all held out: both voices speak
    heldout = read_manifest(root / "heldout.jsonl")
    assert [r.id for r in heldout] == ["r1", "r2", "r3", "r4"]
    hibari = [clip for r in heldout for clip in r.speech if clip.source == "hibari"]
    assert len(hibari) == 4 and all(clip.wer is not None and clip.wer <= 0.25 for clip in hibari)
    assert (
        stats.teacher_cache is not None and stats.teacher_cache["bytes_per_token"] < 300
    )  # 64 x (2 + 2) bytes
    reader = LogitCacheReader(root / "teacher_logits")
    cache = FeatureCache(root)
    for record in heldout:
        assert record.teacher_response and record.system == "Answer the question in a few words."
        assert reader.get(record.id)[0].shape == (len(record.teacher_response_ids or []) + 1, 64)
        for clip in record.speech:
            assert cache.get(clip.audio).shape[1] == 384
