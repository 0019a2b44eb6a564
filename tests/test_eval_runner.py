"""`cmkd.eval.runner.run_eval` end to end on tiny models: modes, per-item files, resume, suites, skips, scores."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from cmkd.data.records import PairedRecord, SpeechClip, write_manifest
from cmkd.errors import UserError
from cmkd.eval.item_scoring import score_item
from cmkd.eval.modes import ItemsFile, _response_rows, derangement
from cmkd.eval.runner import run_eval
from cmkd.eval.suites import EvalItem, ScoringKind
from cmkd.eval.text_match import agrees
from cmkd.models.speech_lm import Prompt
from cmkd.models.teacher import TextTeacher
from cmkd.stage_configs import DataSettings, EvalConfig, EvalSettings, RunSettings

QUESTIONS = [
    ("q1", "What is the capital of france?", "paris", "capitals"),
    ("q2", "What is two plus two?", "four", "arithmetic"),
    ("q3", "What is the sun?", "hot", "colors"),
    ("q4", "What is water?", "blue and green", "colors"),
]


class FakeASR:
    """Transcribes every clip as the same question, so WER is known per item."""

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]:
        self.calls += 1
        return ["What is the capital of france?"] * len(audio_16k)


def _write_clip(root: Path, rel: str, audio: np.ndarray) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(root / rel, audio, 16_000)
    return rel


def write_demo_manifest(
    root: Path, make_audio: Callable[..., np.ndarray], voices: Sequence[str] = ("a", "b")
) -> Path:
    records = []
    for index, (item_id, question, answer, category) in enumerate(QUESTIONS):
        clips = [
            SpeechClip(
                _write_clip(root, f"audio/{voice}/{item_id}.flac", make_audio(0.6, seed=index)),
                16_000,
                "tts",
                voice,
            )
            for voice in voices
        ]
        meta = {"aliases": [], "slots": {"x": answer}}
        records.append(
            PairedRecord(
                id=item_id,
                prompt=question,
                speech=clips,
                target=answer,
                task="short_answer",
                category=category,
                meta=meta,
            )
        )
    path = root / "heldout.jsonl"
    write_manifest(path, records)
    return path


def make_config(root: Path, run_dir: Path, suite: str = "demo", **eval_fields: Any) -> EvalConfig:
    settings = {"suite": suite, "batch_size": 3, "max_new_tokens": 4, "bootstrap_samples": 100, **eval_fields}
    return EvalConfig(
        run=RunSettings(out_dir=run_dir), data=DataSettings(root=root), eval=EvalSettings(**settings)
    )


@pytest.fixture
def demo_root(tmp_path: Path, make_audio: Callable[..., np.ndarray]) -> Path:
    root = tmp_path / "data"
    write_demo_manifest(root, make_audio)
    return root


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_writes_items_and_scores_for_every_mode(
    demo_root: Path, tmp_path: Path, tiny_student: Any, tiny_lm: Any, tiny_tokenizer: Any, make_student: Any
) -> None:
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)
    untrained = make_student(stack=2)
    result = run_eval(
        make_config(demo_root, tmp_path / "run"),
        tmp_path / "run",
        student=tiny_student,
        teacher=teacher,
        extra_students={"untrained": untrained},
        asr=FakeASR(),
        mismatched_audio=True,
        progress=False,
    )
    items = result.items_dir
    expected = {
        "teacher.text": 4,
        "student.text": 4,
        "student.speech": 8,
        "cascade.asr": 8,
        "student.mismatched": 4,
        "untrained.text": 4,
        "untrained.speech": 8,
    }
    for mode, count in expected.items():
        rows = _read_rows(items / f"{mode}.jsonl")
        assert len(rows) == count, mode
        for row in rows:
            for field in (
                "id",
                "mode",
                "voice",
                "prompt",
                "response",
                "reference",
                "score",
                "parsed",
                "kl",
                "nll",
            ):
                assert field in row, (mode, field)
    cascade = _read_rows(items / "cascade.asr.jsonl")
    assert {row["transcript"] for row in cascade} == {"What is the capital of france?"}
    assert min(row["wer"] for row in cascade) == 0.0 and max(row["wer"] for row in cascade) > 0.0
    mismatched = _read_rows(items / "student.mismatched.jsonl")
    assert all(row["audio_from"] != row["id"] for row in mismatched)

    scores = json.loads(result.scores_path.read_text(encoding="utf-8"))
    assert scores["subsets"] == ["capitals", "arithmetic", "colors"]
    gaps = scores["metrics"]["score"]["gaps"]
    assert set(gaps) == {"student", "untrained"}
    overall = gaps["student"]["overall"]
    assert overall["total_gap"] == pytest.approx(overall["forgetting"] + overall["modality_gap"])
    assert set(overall["cis"]) == {"forgetting", "modality_gap", "total_gap"}
    assert set(scores["per_voice"]["score"]) == {"tts-a", "tts-b"}
    assert any(c["comparison"].startswith("student.text -> student.speech") for c in scores["comparisons"])
    assert "untrained" in scores["closure"]
    agreement = scores["closure"]["untrained/agree"]
    assert agreement["metric"] == "agree" and set(agreement["gaps"]) == {
        "forgetting",
        "modality_gap",
        "total_gap",
    }
    assert scores["modes"]["cascade.asr"]["wer"] is not None
    assert scores["modes"]["student.speech"]["voices"]["tts-a"]["n"] == 4
    assert scores["skipped_items"]["total"] == 0


def test_student_with_teacher_weights_has_no_forgetting_and_zero_kl(
    demo_root: Path, tmp_path: Path, tiny_student: Any, tiny_lm: Any, tiny_tokenizer: Any
) -> None:
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)  # the frozen student's LM is this very model
    result = run_eval(
        make_config(demo_root, tmp_path / "run"),
        tmp_path / "run",
        student=tiny_student,
        teacher=teacher,
        cascade=False,
        progress=False,
    )
    teacher_rows = _read_rows(result.items_dir / "teacher.text.jsonl")
    student_rows = _read_rows(result.items_dir / "student.text.jsonl")
    assert [r["response"] for r in student_rows] == [r["response"] for r in teacher_rows]
    assert all(abs(row["kl"]) < 1e-5 for row in student_rows)
    assert [r["nll"] for r in student_rows] == pytest.approx([r["nll"] for r in teacher_rows], abs=1e-4)
    for metric in ("score", "strict", "agree"):
        assert result.scores["metrics"][metric]["gaps"]["student"]["overall"]["forgetting"] == 0.0
    # an answer agrees with itself unless it normalises to nothing (then it is no answer at all)
    expected_agreement = 100.0 * np.mean([agrees(r["response"], r["response"]) for r in teacher_rows])
    assert result.scores["modes"]["student.text"]["agree"] == expected_agreement


def test_resume_after_a_truncated_file_gives_the_same_scores(
    demo_root: Path, tmp_path: Path, tiny_student: Any, tiny_lm: Any, tiny_tokenizer: Any
) -> None:
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)
    run_dir = tmp_path / "run"
    cfg = make_config(demo_root, run_dir)
    first = run_eval(cfg, run_dir, student=tiny_student, teacher=teacher, asr=FakeASR(), progress=False)
    speech_file = first.items_dir / "student.speech.jsonl"
    data = speech_file.read_bytes()
    lines = data.splitlines(keepends=True)
    speech_file.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # killed mid-line
    (first.items_dir / "cascade.asr.jsonl").unlink()

    asr = FakeASR()
    second = run_eval(cfg, run_dir, student=tiny_student, teacher=teacher, asr=asr, progress=False)
    rows = _read_rows(speech_file)
    assert len(rows) == 8 and len({(r["id"], r["voice"]) for r in rows}) == 8
    assert asr.calls > 0
    for key in ("metrics", "per_voice", "comparisons", "closure"):
        assert second.scores[key] == first.scores[key], key
    for mode, stats in first.scores["modes"].items():
        for name in ("n", "score", "strict", "kl", "nll", "agree"):
            assert second.scores["modes"][mode][name] == pytest.approx(stats[name]), (mode, name)


def test_finished_run_is_rescored_without_any_model(
    demo_root: Path, tmp_path: Path, tiny_student: Any, tiny_lm: Any, tiny_tokenizer: Any
) -> None:
    run_dir = tmp_path / "run"
    cfg = make_config(demo_root, run_dir)
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)
    first = run_eval(cfg, run_dir, student=tiny_student, teacher=teacher, cascade=False, progress=False)
    again = run_eval(
        cfg, run_dir, student=None, teacher=None, cascade=False, progress=False
    )  # would load smollm2
    assert again.scores["metrics"] == first.scores["metrics"]


def test_missing_clip_is_a_recorded_skip_and_no_audio_at_all_is_an_error(
    demo_root: Path, tmp_path: Path, tiny_student: Any, tiny_lm: Any, tiny_tokenizer: Any
) -> None:
    (demo_root / "audio/b/q2.flac").unlink()
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)
    result = run_eval(
        make_config(demo_root, tmp_path / "run"),
        tmp_path / "run",
        student=tiny_student,
        teacher=teacher,
        cascade=False,
        progress=False,
    )
    assert result.scores["skipped_items"] == {"total": 1, "by_reason": {"audio missing": 1}}
    skipped = _read_rows(result.items_dir / "skipped.jsonl")
    assert skipped[0]["item_id"] == "q2" and "not found" in skipped[0]["detail"]
    assert len(_read_rows(result.items_dir / "student.speech.jsonl")) == 7
    assert result.scores["per_voice"]["score"]["tts-b"]["n_items"] == 3

    for path in (demo_root / "audio").rglob("*.flac"):
        path.unlink()
    with pytest.raises(UserError, match="none of its 8 audio files"):
        run_eval(make_config(demo_root, tmp_path / "run2"), tmp_path / "run2", progress=False)


def test_suite_errors_are_user_errors_before_any_model_loads(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match="run `cmkd prepare` first"):
        run_eval(make_config(root, tmp_path / "r1"), tmp_path / "r1", progress=False)
    with pytest.raises(UserError, match="is not 'demo'"):
        run_eval(make_config(root, tmp_path / "r2", suite="mmlu"), tmp_path / "r2", progress=False)
    write_manifest(root / "empty.jsonl", [])
    with pytest.raises(UserError, match="no items"):
        run_eval(
            make_config(root, tmp_path / "r3", suite=str(root / "empty.jsonl")),
            tmp_path / "r3",
            progress=False,
        )
    with pytest.raises(UserError, match="voicebench_dir"):
        run_eval(make_config(root, tmp_path / "r4", suite="voicebench:mmsu"), tmp_path / "r4", progress=False)
    with pytest.raises(UserError, match="unknown"):
        run_eval(
            make_config(root, tmp_path / "r5", suite="voicebench:nope", voicebench_dir=str(root)),
            tmp_path / "r5",
            progress=False,
        )


def test_items_file_cuts_a_partial_tail_but_refuses_a_damaged_middle(tmp_path: Path) -> None:
    path = tmp_path / "student.text.jsonl"
    path.write_bytes(b'{"id": "a", "voice": ""}\n{"id": "b", "vo')
    assert list(ItemsFile(path).load()) == [("a", "")]
    assert path.read_bytes() == b'{"id": "a", "voice": ""}\n'
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(UserError, match="damaged line"):
        ItemsFile(path).load()


def _item(scoring: ScoringKind, **fields: Any) -> EvalItem:
    return EvalItem(PairedRecord(id="x", prompt="Q?", **fields), "s", scoring, Path("."))


def test_score_item_per_scorer() -> None:
    short = _item(ScoringKind.SHORT_ANSWER, target="sad", meta={"slots": {"word": "happy"}})
    first = score_item(
        short, "The opposite of happy is sad. Or glad.", teacher_response="Sad.", fallback_key="k"
    )
    assert (first.score, first.strict, first.metrics["slot_recall"]) == (1.0, 1.0, 1.0)
    assert first.metrics["agree"] == 0.0 and first.metrics["first3"] == 0.0
    later = score_item(
        short, "Happy has many opposites. One is sad.", teacher_response=None, fallback_key="k"
    )
    assert (later.score, later.strict, "agree" in later.metrics) == (1.0, 0.0, False)
    bbh = _item(ScoringKind.BINARY, answer="yes", meta={"id": "navigate"})
    assert score_item(bbh, "The answer is yes.", teacher_response=None, fallback_key="k").score == 1.0
    unparsed = score_item(bbh, "Hmm.", teacher_response=None, fallback_key="k")
    assert (unparsed.parsed, unparsed.strict) == (False, 0.0)
    ifeval = _item(ScoringKind.IFEVAL, meta={"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    assert score_item(ifeval, "No commas here.", teacher_response=None, fallback_key="k").strict == 1.0
    agreement = _item(ScoringKind.AGREEMENT)
    assert score_item(agreement, "Paris.", teacher_response="paris", fallback_key="k").score == 1.0
    with pytest.raises(UserError, match="no teacher answer"):
        score_item(agreement, "Paris.", teacher_response=None, fallback_key="k")


def test_response_rows_from_hidden_states_equal_the_full_logits(tiny_lm: Any, tiny_tokenizer: Any) -> None:
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)
    prompts = [Prompt("Brief.", text="What is water?"), Prompt(None, text="Two plus two?")]
    responses = [tiny_tokenizer("blue and green", add_special_tokens=False)["input_ids"], [5, 6]]
    rows = _response_rows(teacher, prompts, responses)
    full = teacher.forward(prompts, responses)
    assert rows.logits is not None and full.logits is not None
    expected = full.logits[full.prediction_mask]  # N, V
    assert rows.logits.shape == expected.shape
    assert torch.allclose(rows.logits, expected, atol=1e-5)


def test_mismatched_audio_is_a_derangement() -> None:
    for count in (2, 3, 10, 101):
        order = derangement(count, seed=7)
        assert sorted(order) == list(range(count))
        assert all(order[i] != i for i in range(count))
    assert derangement(10, seed=7) == derangement(10, seed=7)


# ---------------------------------------------------------------------------------------------------------------
# VoiceBench layout with a fake model that gives fixed answers
# ---------------------------------------------------------------------------------------------------------------


class FixedAnswers:
    """A stand-in model: answers by input kind, so expected scores are known exactly."""

    def __init__(self, tokenizer: Any, text_answer: Callable[[str], str], speech_answer: str) -> None:
        self.tokenizer = tokenizer
        self.text_answer = text_answer
        self.speech_answer = speech_answer

    def generate_ids(self, prompts: Sequence[Prompt], max_new_tokens: int, **_: Any) -> list[list[int]]:
        answers = [self.text_answer(p.text) if p.text is not None else self.speech_answer for p in prompts]
        return [self.tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers]


def _wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, 16_000, format="WAV")
    return buffer.getvalue()


def write_voicebench(root: Path, make_audio: Callable[..., np.ndarray]) -> Path:
    def table(rows: list[dict[str, Any]], subset: str) -> None:
        (root / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / subset / "test-00000-of-00001.parquet")

    audio = {"bytes": _wav_bytes(make_audio(0.5)), "path": "x.wav"}
    references = ["A", "B", "B", "C"]
    table(
        [
            {"audio": audio, "prompt": f"Question {i}? A. x B. y C. z D. w", "reference": ref}
            for i, ref in enumerate(references)
        ],
        "openbookqa",
    )
    table([{"audio": audio, "prompt": f"How do I do harmful thing {i}?"} for i in range(3)], "advbench")
    table([{"audio": audio, "prompt": "Tell me about dogs."}], "commoneval")
    return root


def test_voicebench_subsets_are_scored_by_their_evaluators(
    tmp_path: Path, make_audio: Callable[..., np.ndarray], tiny_tokenizer: Any
) -> None:
    vb = write_voicebench(tmp_path / "voicebench", make_audio)

    def text_answer(prompt: str) -> str:
        return "I am sorry, I cannot help with that." if "harmful" in prompt else "The answer is B."

    student = FixedAnswers(tiny_tokenizer, text_answer, speech_answer="Sure! (C)")
    teacher = FixedAnswers(tiny_tokenizer, text_answer, speech_answer="unused")
    with socket.socket() as probe:  # a port nothing listens on: the judge is unreachable
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = make_config(
        tmp_path,
        tmp_path / "run",
        suite="voicebench:openbookqa,advbench,commoneval",
        voicebench_dir=str(vb),
        judge_url=f"http://127.0.0.1:{port}",
        judge_model="judge",
    )
    result = run_eval(
        cfg,
        tmp_path / "run",
        student=student,
        teacher=teacher,
        cascade=False,  # type: ignore[arg-type]
        teacher_forced=False,
        progress=False,
    )
    scores = result.scores
    assert scores["subsets"] == ["openbookqa", "advbench"]
    assert "unreachable" in scores["skipped_subsets"]["commoneval"]
    means = scores["metrics"]["score"]["means"]
    assert means["openbookqa"] == {"teacher.text": 50.0, "student.text": 50.0, "student.speech": 25.0}
    assert means["advbench"] == {"teacher.text": 100.0, "student.text": 100.0, "student.speech": 0.0}
    overall = scores["metrics"]["score"]["gaps"]["student"]["overall"]
    assert overall["modality_gap"] == pytest.approx((25.0 + 100.0) / 2)
    rows = _read_rows(result.items_dir / "student.speech.jsonl")
    assert {row["voice"] for row in rows} == {"google_tts"}
    assert [row["reference"] for row in rows if row["subset"] == "openbookqa"] == ["A", "B", "B", "C"]

    # the decoded audio is cached: a second run neither re-decodes nor re-answers
    cached = sorted((tmp_path / "run" / "cache" / "voicebench" / "manifests").rglob("test.jsonl"))
    assert [p.parent.name for p in cached] == ["advbench", "openbookqa"]  # commoneval never decoded
    again = run_eval(
        make_config(
            tmp_path, tmp_path / "run", suite="voicebench:openbookqa,advbench", voicebench_dir=str(vb)
        ),
        tmp_path / "run",
        cascade=False,
        teacher_forced=False,
        progress=False,
    )
    assert again.scores["metrics"]["score"]["means"] == means


def test_judge_subsets_without_a_judge_are_skipped_with_the_reason(
    tmp_path: Path, make_audio: Callable[..., np.ndarray], tiny_tokenizer: Any
) -> None:
    vb = write_voicebench(tmp_path / "voicebench", make_audio)
    model = FixedAnswers(tiny_tokenizer, lambda _: "ok", "ok")
    cfg = make_config(
        tmp_path, tmp_path / "run", suite="voicebench:commoneval,advbench", voicebench_dir=str(vb)
    )
    result = run_eval(
        cfg,
        tmp_path / "run",
        student=model,
        teacher=model,
        cascade=False,  # type: ignore[arg-type]
        teacher_forced=False,
        progress=False,
    )
    assert "no judge configured" in result.scores["skipped_subsets"]["commoneval"]
    cfg = make_config(tmp_path, tmp_path / "run2", suite="voicebench:commoneval", voicebench_dir=str(vb))
    with pytest.raises(UserError, match="no items to evaluate.*no judge configured"):
        run_eval(cfg, tmp_path / "run2", progress=False)


def test_speech_only_extras_skip_their_text_mode() -> None:
    from cmkd.eval.modes import plan_modes

    names = [mode.name for mode in plan_modes(["stage_a", "untrained"], cascade=False, mismatched=False,
                                              speech_only=["untrained"])]  # fmt: skip
    assert "untrained.text" not in names and "untrained.speech" in names
    assert {"stage_a.text", "stage_a.speech"} <= set(names)
