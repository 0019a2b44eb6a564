"""Bad input, case by case (the list is `bad_inputs.CASES`; docs/bad-input.md is rendered from what runs here).

Batch stages must record a reject naming the item and field and go on: one `cmkd prepare` run reads a JSONL
source with every bad text line, another a VoiceBench parquet with every bad clip, and one `cmkd eval` run a
manifest with every bad clip file. Everything else must stop the command with exit code 2 and exactly one
`cmkd: error:` line naming the item and field (or the config key), never a traceback: those cases run the real
CLI entry point in process, and a few again as `python -m cmkd.cli` to check the whole of stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import test_eval_runner as eval_tests
import test_prepare as prepare_tests
from cmkd.cli import resolve_stage_config
from cmkd.config import save_config
from cmkd.data.prepare import run_prepare
from cmkd.data.records import PairedRecord, SpeechClip, read_manifest, write_manifest
from cmkd.eval.runner import run_eval
from cmkd.models.teacher import TextTeacher
from cmkd.stage_configs import SourceSettings

from .bad_inputs import (
    AUDIO_BYTES,
    CASES,
    DOC_PATH,
    GOOD_SOURCE_LINES,
    SOURCE_FILE,
    SUBPROCESS_CASES,
    WRITE_DOC_ENV,
    Case,
    doc_case_names,
    observe,
    tone,
    wav_bytes,
)
from .harness import run_cli
from .worlds import eval_args, make_world, train_args, write_prepare_config

_GROUP_RUNS: dict[str, Any] = {}
"""One batch run per group, shared by that group's cases (the first case to run pays for it)."""


def _cases(group: str) -> list[Any]:
    return [pytest.param(case, id=case.name) for case in CASES if case.group == group]


def _reject_message(row: dict[str, Any]) -> str:
    return f"{row['item_id']}/{row['field']}: {row['reason']} ({row['detail']})"


# ---------------------------------------------------------------------------------------------------------------
# Batch: a JSONL question source (cmkd prepare)
# ---------------------------------------------------------------------------------------------------------------


def _text_source_rejects(tmp_path: Path, lm: Any, tokenizer: Any, whisper: Any) -> list[dict[str, Any]]:
    source = tmp_path / SOURCE_FILE
    good = [
        json.dumps({"id": i, "question": q, "answer": a}).encode() + b"\n"
        for i, q, a in prepare_tests.QUESTIONS[:GOOD_SOURCE_LINES]
    ]
    source.write_bytes(b"".join(good + [case.payload for case in CASES if case.group == "text source"]))  # type: ignore[misc]
    root = tmp_path / "data"
    cfg = prepare_tests.make_config(root, source)
    backends = prepare_tests.tiny_backends(lm, tokenizer, whisper, prepare_tests.Calls())
    run_prepare(cfg, root, progress=False, heldout_fraction=0.0, backends=backends)
    assert read_manifest(root / "train.jsonl"), "the good questions must still be prepared"
    return prepare_tests.jsonl_rows(root / "rejects.jsonl")


@pytest.mark.parametrize("case", _cases("text source"))
def test_text_source_line_is_rejected_by_item_and_field(
    case: Case, tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    if "text" not in _GROUP_RUNS:
        _GROUP_RUNS["text"] = _text_source_rejects(tmp_path, tiny_lm, tiny_tokenizer, tiny_whisper)
    item, field = case.names[0], case.names[1]
    rows = [row for row in _GROUP_RUNS["text"] if row["item_id"] == item and row["field"] == field]
    observe(
        case, "reject" if rows else "dropped", _reject_message(rows[0]) if rows else f"no reject for {item}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Batch: embedded audio in a VoiceBench parquet (cmkd prepare)
# ---------------------------------------------------------------------------------------------------------------


def _voicebench_run(
    tmp_path: Path, lm: Any, tokenizer: Any, whisper: Any
) -> tuple[Path, list[dict[str, Any]]]:
    subset = tmp_path / "vb" / "openbookqa"
    subset.mkdir(parents=True)
    words = ["red", "blue", "green", "black", "white", "pink", "gray", "gold", "brown"]
    rows = []
    for index, case in enumerate(case for case in CASES if case.group == "audio source"):
        kind = str(case.payload)
        audio = None if kind == "missing" else {"bytes": AUDIO_BYTES[kind](), "path": f"{case.name}.wav"}
        rows.append({"prompt": f"Which thing is {words[index]}?", "audio": audio, "reference": "A"})
    pq.write_table(pa.Table.from_pylist(rows), subset / "test-00000-of-00001.parquet")
    root = tmp_path / "data"
    cfg = prepare_tests.make_config(root, tmp_path / "unused")
    cfg.source = SourceSettings(kind="voicebench", path=str(tmp_path / "vb"))
    backends = prepare_tests.tiny_backends(lm, tokenizer, whisper, prepare_tests.Calls())
    run_prepare(cfg, root, progress=False, backends=backends)
    return root, prepare_tests.jsonl_rows(root / "rejects.jsonl")


@pytest.mark.parametrize("case", _cases("audio source"))
def test_embedded_audio_is_rejected_or_converted(
    case: Case, tmp_path: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    if "voicebench" not in _GROUP_RUNS:
        _GROUP_RUNS["voicebench"] = _voicebench_run(tmp_path, tiny_lm, tiny_tokenizer, tiny_whisper)
    root, rejects = _GROUP_RUNS["voicebench"]
    item = case.names[0]
    rows = [row for row in rejects if row["item_id"] == item]
    if rows:
        observe(case, "reject", _reject_message(rows[0]))
        return
    records = {record.id: record for record in read_manifest(root / "heldout.jsonl")}
    if item not in records:
        observe(case, "dropped", f"{item}: neither in heldout.jsonl nor in rejects.jsonl")
        return
    (clip,) = records[item].speech
    info = sf.info(str(root / clip.audio))
    observe(
        case,
        "accepted",
        f"{item}: stored as a {info.samplerate} Hz, {info.channels}-channel FLAC of {info.duration:.2f} s",
    )
    assert (info.samplerate, info.channels) == (16_000, 1)


# ---------------------------------------------------------------------------------------------------------------
# Batch: clip files of an eval manifest (cmkd eval)
# ---------------------------------------------------------------------------------------------------------------


def _eval_run(tmp_path: Path, student: Any, lm: Any, tokenizer: Any) -> Path:
    root = tmp_path / "evaldata"
    (root / "audio").mkdir(parents=True)
    outside = tmp_path / "outside.wav"
    outside.write_bytes(wav_bytes(tone(0.5)))
    records = []
    for case in (case for case in CASES if case.group == "eval audio"):
        kind, relative = str(case.payload), f"audio/{case.name}.wav"
        if kind == "symlink":
            (root / relative).symlink_to(outside)
        elif kind != "missing":
            (root / relative).write_bytes(AUDIO_BYTES[kind]())
        clip = SpeechClip(relative, 16_000, "tts", "v")
        records.append(
            PairedRecord(
                case.name, "What is water?", speech=[clip], target="x", task="short_answer", category="c"
            )
        )
    write_manifest(root / "heldout.jsonl", records)
    run_dir = tmp_path / "evalrun"
    run_eval(
        eval_tests.make_config(root, run_dir),
        run_dir,
        student=student,
        teacher=TextTeacher(lm, tokenizer),
        cascade=False,
        teacher_forced=False,
        progress=False,
    )
    return run_dir / "items"


@pytest.mark.parametrize("case", _cases("eval audio"))
def test_eval_clip_is_skipped_with_a_reason_or_used(
    case: Case, tmp_path: Path, tiny_student: Any, tiny_lm: Any, tiny_tokenizer: Any
) -> None:
    if "eval" not in _GROUP_RUNS:
        _GROUP_RUNS["eval"] = _eval_run(tmp_path, tiny_student, tiny_lm, tiny_tokenizer)
    items = _GROUP_RUNS["eval"]
    skipped = [
        row for row in prepare_tests.jsonl_rows(items / "skipped.jsonl") if row["item_id"] == case.name
    ]
    answered = [
        row for row in prepare_tests.jsonl_rows(items / "student.speech.jsonl") if row["id"] == case.name
    ]
    if skipped:
        observe(case, "skip", _reject_message(skipped[0]))
    elif answered:
        observe(case, "accepted", f"{case.name}: read as 16 kHz mono and answered (a student.speech row)")
    else:
        observe(case, "dropped", f"{case.name}: neither answered nor in skipped.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# The CLI: exit 2 and one line
# ---------------------------------------------------------------------------------------------------------------


def _rewrite_record(index: int, change: Callable[[dict[str, Any]], None]) -> None:
    path = Path("data/train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[index])
    change(row)
    lines[index] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _set_audio(value: str) -> Callable[[dict[str, Any]], None]:
    return lambda row: row["speech"][0].__setitem__("audio", value)


def _copy_lm(name: str) -> Path:
    shutil.copytree("lm", name)
    return Path(name)


def _other_tokenizer() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("lm")
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(_copy_lm("lm_other"))


def _no_chat_template() -> None:
    directory = _copy_lm("lm_nochat")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config), encoding="utf-8")


def _bad_model_type() -> None:
    config_path = _copy_lm("lm_badtype") / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["model_type"] = "no_such_model"
    config_path.write_text(json.dumps(config), encoding="utf-8")


def _pickle_only() -> None:
    directory = _copy_lm("lm_pickle")
    torch.save(load_file(str(directory / "model.safetensors")), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def _outside(name: str, data: bytes) -> Path:
    target = Path("outside") / name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    return target.resolve()


RECIPES: dict[str, Callable[[Any], None]] = {
    "none": lambda _: None,
    "prepare": lambda _: None,
    "manifest-broken-line": lambda _: Path("data/train.jsonl").write_text(
        "\n".join(
            line if number != 1 else '{"id": "q1", "text": '
            for number, line in enumerate(Path("data/train.jsonl").read_text().splitlines())
        )
        + "\n"
    ),
    "manifest-no-prompt": lambda _: _rewrite_record(0, lambda row: row["text"].pop("prompt")),
    "manifest-sr-string": lambda _: _rewrite_record(
        0, lambda row: row["speech"][0].__setitem__("sr", "16000")
    ),
    "manifest-typo": lambda _: _rewrite_record(0, lambda row: row.__setitem__("promt", "What?")),
    "manifest-duplicate": lambda _: Path("data/train.jsonl").write_text(
        Path("data/train.jsonl").read_text() + Path("data/train.jsonl").read_text().splitlines()[0] + "\n"
    ),
    "audio-dotdot": lambda _: _rewrite_record(0, _set_audio("../../etc/passwd")),
    "audio-absolute": lambda _: _rewrite_record(0, _set_audio("/etc/passwd")),
    "audio-symlink": lambda _: (
        Path("data/audio/q0.flac").unlink(),
        Path("data/audio/q0.flac").symlink_to(_outside("q0.flac", wav_bytes(tone(0.5)))),
    ),
    "manifest-symlink": lambda _: Path("data/elsewhere.jsonl").symlink_to(
        _outside("train.jsonl", Path("data/train.jsonl").read_bytes())
    ),
    "clip-deleted": lambda _: Path("data/audio/q0.flac").unlink(),
    "clip-empty": lambda _: Path("data/audio/q0.flac").write_bytes(b""),
    "clip-corrupt": lambda _: Path("data/audio/q0.flac").write_bytes(AUDIO_BYTES["corrupt"]()),
    "clip-nan": lambda _: Path("data/audio/q0.flac").write_bytes(AUDIO_BYTES["nan"]()),
    "clip-two-hours": lambda _: Path("data/audio/q0.flac").write_bytes(AUDIO_BYTES["two-hours"]()),
    "items-damaged": lambda _: (
        Path("evalrun/items").mkdir(parents=True),
        # An earlier run of the same command left its config (the run-dir check) and a damaged items file.
        save_config(resolve_stage_config("eval", eval_args("evalrun")[1:]), Path("evalrun/config.yaml")),
        Path("evalrun/items/student.text.jsonl").write_bytes(
            b'{"id": "q1", "voice": ""}\nnot json\n{"id": "q2", "voice": ""}\n'
        ),
    ),
    "lm-other-tokenizer": lambda _: _other_tokenizer(),
    "lm-no-chat-template": lambda _: _no_chat_template(),
    "lm-bad-type": lambda _: _bad_model_type(),
    "lm-pickle-only": lambda _: _pickle_only(),
    "student-other-config": lambda make_student: make_student(stack=2).save(Path("student_stack2")),
    "broken-yaml": lambda _: Path("broken.yaml").write_text("loss: [unclosed\n"),
}


def _own_stderr_lines(stderr: str) -> list[str]:
    """stderr without the deprecation warnings third-party packages print (`.../site-packages/x.py:12:
    FutureWarning: ...` and the source line after it): those are not cmkd's output."""
    lines, skip_next = [], False
    for line in stderr.strip().splitlines():
        if skip_next:
            skip_next = False
        elif "site-packages" in line and "Warning:" in line:
            skip_next = True
        elif line.strip():
            lines.append(line)
    return lines


def _command(case: Case) -> list[str]:
    """The case's arguments after the stage's base command (later `key=value` overrides win)."""
    _, args = case.payload  # type: ignore[misc]
    stage, extra = args[0], list(args[1:])
    if stage == "train":  # one step over all six items: every clip is read before anything is saved
        return [*train_args("run", "train.steps=1", "train.batch_size=6"), *extra]
    if stage == "eval":
        return [*eval_args("evalrun"), *extra]
    return [stage, *extra]


@pytest.mark.parametrize("case", [p for group in ("manifest", "models", "settings") for p in _cases(group)])
def test_cli_stops_with_one_line_naming_item_and_field(
    case: Case,
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    make_student: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_world(tiny_run, make_audio, monkeypatch)
    write_prepare_config("prep", "prepare.yaml")
    recipe, _ = case.payload  # type: ignore[misc]
    RECIPES[recipe](make_student)
    command = _command(case)
    if case.name in SUBPROCESS_CASES:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        done = subprocess.run(
            [sys.executable, "-m", "cmkd.cli", *command], env=env, capture_output=True, text=True, timeout=300
        )
        lines = _own_stderr_lines(done.stderr)
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("cmkd: error: "), done.stderr
        observe(case, "exit 2", lines[0].removeprefix("cmkd: error: "))
        return
    result = run_cli(command, capsys)
    observe(case, f"exit {result.code}", result.error if result.code else result.out[-200:])


# ---------------------------------------------------------------------------------------------------------------
# The list itself and the doc made from it
# ---------------------------------------------------------------------------------------------------------------


def test_there_are_at_least_thirty_cases_and_the_doc_lists_each_of_them() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) >= 30
    if os.environ.get(WRITE_DOC_ENV) == "1":
        pytest.skip("this session rewrites the doc at its end")
    assert doc_case_names() == names, (
        f"{DOC_PATH} is out of date: regenerate it with `make reliability` (CMKD_WRITE_BAD_INPUT_DOC=1)"
    )
