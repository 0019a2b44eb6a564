"""Faults: kill -9 at named points of `cmkd prepare`, `cmkd train` and `cmkd eval`, then the same command again.

Each point is killed in a forked child (harness.KillPoint: a call of a named function, before it runs, after it
returns, or half-way through a write), then the very same command runs to the end and its outputs are compared
with an uninterrupted run: byte-identical files for prepare, weights within 1e-6 and every metrics line exactly
once for train, the same per-item rows (no lost or duplicated line) and scores for eval.

A few points run in the default suite; all of them, and kills at random moments of a real `python -m cmkd.cli
train` process, are marked `reliability_full` (`make reliability`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cmkd.cli import main
from cmkd.errors import UserError

from .harness import CliResult, KillPoint, fill_disk_at, jsonl_lines, jsonl_payload, record, run_forked
from .worlds import (
    compare_eval,
    compare_prepare,
    compare_train,
    eval_args,
    eval_outcome,
    make_world,
    prepare_outcome,
    reference,
    train_args,
    train_outcome,
    write_prepare_config,
)


def _metrics_line(log: Any, step: int, values: dict[str, float]) -> tuple[Path, bytes]:
    return jsonl_payload(log.path, [{"step": step, **values}])


def _items_rows(items_file: Any, rows: list[dict[str, Any]]) -> tuple[Path, bytes]:
    return jsonl_payload(items_file.path, rows)


PREPARE_POINTS = [
    KillPoint("prepare.teacher-batch", "cmkd.data.teacher_targets:generate_batch", 3, "after",
              "batch 3's answers generated, not yet logged"),
    KillPoint("prepare.topk-shard", "cmkd.data.logit_cache:LogitCacheWriter.write", 2, "after",
              "a top-k shard on disk whose batch is not in the work log"),
    KillPoint("prepare.torn-worklog", "cmkd.data.prepare_work:append_jsonl", 2, "torn",
              "half of a work-log append on disk", torn_path=jsonl_payload),
    KillPoint("prepare.tts-clip", "env:FAKE_TTS_KILL_AT", 7, "during",
              "the TTS command kills prepare while it writes clip 5"),
    KillPoint("prepare.asr-batch", "test_prepare:FakeASR.transcribe", 2, "before",
              "inside the ASR round trip of the second chunk"),
    KillPoint("prepare.feature-file", "cmkd.data.prepare_stages:write_clip_features", 5, "after",
              "a feature file written, not logged"),
    KillPoint("prepare.atomic-rename", "os:replace", 9, "before",
              "a finished temp file not yet renamed (any writer: audio, features, manifests)"),
    KillPoint("prepare.between-manifests", "cmkd.data.prepare_assemble:write_manifest", 1, "after",
              "train.jsonl replaced, heldout.jsonl not"),
    KillPoint("prepare.before-rejects", "cmkd.data.prepare_assemble:atomic_write_bytes", 1, "before",
              "manifests written, rejects.jsonl not"),
    KillPoint("prepare.cache-staged", "cmkd.data.prepare_assemble:atomic_write_text", 1, "before",
              "the teacher cache staged but not marked complete"),
    KillPoint("prepare.before-stats", "cmkd.data.prepare:atomic_write_text", 1, "before",
              "every output written except stats"),
]  # fmt: skip

TRAIN_POINTS = [
    KillPoint("train.teacher-pass", "cmkd.train.teacher_rows:OnlineTeacherRows.__call__", 4, "before",
              "step 4, before the teacher pass"),
    KillPoint("train.mid-backward", "accelerate:Accelerator.backward", 5, "after",
              "step 3, between the T→T and S→T backward passes"),
    KillPoint("train.optimizer-step", "accelerate.optimizer:AcceleratedOptimizer.step", 3, "after",
              "step 3's update applied, not counted or logged"),
    KillPoint("train.after-metrics-line", "cmkd.train.metrics_log:MetricsLog.write", 3, "after",
              "step 3 logged but never checkpointed: its line must not appear twice"),
    KillPoint("train.torn-metrics-line", "cmkd.train.metrics_log:MetricsLog.write", 5, "torn",
              "half of step 5's metrics line", torn_path=_metrics_line),
    KillPoint("train.checkpoint-staged", "cmkd.train.state:torch.save", 2, "after",
              "checkpoint 4 complete in its staging dir, not renamed"),
    KillPoint("train.checkpoint-renamed", "cmkd.train.state:_write_latest", 2, "before",
              "checkpoint 4 renamed, `latest` still names checkpoint 2"),
    KillPoint("train.before-prune", "cmkd.train.state:_write_latest", 3, "after",
              "`latest` names checkpoint 6, checkpoint 2 not pruned yet"),
    KillPoint("train.student-save", "safetensors.torch:save_file", 4, "after",
              "the final student's weights in a temp file, not renamed"),
]  # fmt: skip

EVAL_POINTS = [
    KillPoint("eval.between-batches", "cmkd.eval.modes:ItemsFile.append", 3, "after",
              "teacher done, the first student batch written"),
    KillPoint("eval.torn-items-line", "cmkd.eval.modes:ItemsFile.append", 5, "torn",
              "half of a speech batch's rows", torn_path=_items_rows),
    KillPoint("eval.mid-batch", "cmkd.eval.runner:run_batch", 6, "before",
              "inside the speech mode, a batch in flight"),
    KillPoint("eval.teacher-forced", "cmkd.eval.modes:teacher_forced_metrics", 8, "before",
              "answers generated, KL/NLL not yet computed"),
    KillPoint("eval.before-skipped-file", "cmkd.eval.runner:atomic_write_text", 1, "before",
              "every mode answered, skipped.jsonl not written"),
    KillPoint("eval.before-scores", "cmkd.eval.runner:atomic_write_text", 2, "before",
              "scores.json not written"),
]  # fmt: skip

FAST_POINTS = {
    "prepare.torn-worklog",
    "prepare.between-manifests",
    "train.torn-metrics-line",
    "train.checkpoint-staged",
    "eval.torn-items-line",
    "eval.between-batches",
}

ALL_POINTS = PREPARE_POINTS + TRAIN_POINTS + EVAL_POINTS


def _command(stage: str) -> tuple[Any, Any, Any, Any, Any]:
    """Work and outcome of the run to kill, work and outcome of the reference run, and the comparison."""
    if stage == "prepare":
        write_prepare_config("prep", "prepare.yaml")
        write_prepare_config("prep_ref", "prepare_ref.yaml")
        return (
            lambda: main(["prepare", "prepare.yaml"]),
            lambda: main(["prepare", "prepare_ref.yaml"]),
            lambda: prepare_outcome(Path("prep")),
            lambda: prepare_outcome(Path("prep_ref")),
            compare_prepare,
        )
    if stage == "train":
        return (
            lambda: main(train_args("run")),
            lambda: main(train_args("ref_train")),
            lambda: train_outcome(Path("run")),
            lambda: train_outcome(Path("ref_train")),
            compare_train,
        )
    return (
        lambda: main(eval_args("run")),
        lambda: main(eval_args("ref_eval")),
        lambda: eval_outcome(Path("run")),
        lambda: eval_outcome(Path("ref_eval")),
        compare_eval,
    )


def _kill_and_resume(point: KillPoint) -> None:
    stage = point.name.split(".")[0]
    work, reference_work, outcome, reference_outcome, compare = _command(stage)
    expected = reference(stage, reference_work, reference_outcome)
    code = run_forked(work, point.arm)
    assert code == -signal.SIGKILL, f"{point.name}: the run ended with {code} instead of being killed there"
    record(faults=1)
    assert run_forked(work) == 0, f"{point.name}: the same command did not finish after the kill"
    found = compare(expected, outcome())
    record(lost=found.lost)
    assert found.lost == 0, f"{point.name} ({point.why}): {found.notes}"


def _params(points: list[KillPoint]) -> list[Any]:
    return [
        pytest.param(
            point,
            id=point.name,
            marks=() if point.name in FAST_POINTS else (pytest.mark.reliability_full,),
        )
        for point in points
    ]


@pytest.mark.parametrize("point", _params(ALL_POINTS))
def test_kill_then_rerun_matches_an_uninterrupted_run(
    point: KillPoint,
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_world(tiny_run, make_audio, monkeypatch)
    _kill_and_resume(point)


def test_there_are_at_least_ten_distinct_kill_points_in_every_stage_together() -> None:
    names = [point.name for point in ALL_POINTS]
    assert len(set(names)) == len(names) >= 10
    assert {name.split(".")[0] for name in names} == {"prepare", "train", "eval"}
    assert set(names) >= FAST_POINTS


# ---------------------------------------------------------------------------------------------------------------
# Kills at random moments of a real process (full suite only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability_full
def test_train_survives_kills_at_random_moments(
    tiny_run: dict[str, Path], tts_counter: Path, make_audio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m cmkd.cli train` killed with SIGKILL after seeded random delays (imports, model loading, steps,
    checkpoints: wherever it happens to be), again and again on one run dir, then finished by the same command."""
    make_world(tiny_run, make_audio, monkeypatch)
    _, reference_work, outcome, reference_outcome, compare = _command("train")
    expected = reference("train", reference_work, reference_outcome)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "cmkd.cli", *train_args("run")]
    rng = random.Random(9)
    kills = 0
    for _ in range(5):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 12.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
    record(faults=kills)
    assert kills >= 3, "the run finished too early to be killed; the delays need adjusting"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    found = compare(expected, outcome())
    record(lost=found.lost)
    assert found.lost == 0, found.notes


# ---------------------------------------------------------------------------------------------------------------
# A full disk: one clear line, the last good state kept, the same command finishes once space returns
# ---------------------------------------------------------------------------------------------------------------


def _disk(name: str, stage: str, target: str, at: int, style: str, full: bool = False) -> Any:
    """A full-disk point: `target` fails from its `at`-th call, reporting it as the real writer does (`style`)."""
    return pytest.param(
        name, stage, target, at, style, id=name, marks=(pytest.mark.reliability_full,) if full else ()
    )


FULL_DISK_POINTS = [
    _disk("prepare.worklog", "prepare", "cmkd.data.prepare_work:append_jsonl", 3, "oserror", full=True),
    _disk("prepare.tts-clip", "prepare", "cmkd.data.tts:write_flac", 3, "oserror"),
    _disk("train.checkpoint-state", "train", "cmkd.train.state:torch.save", 2, "torch"),
    _disk("train.student-weights", "train", "safetensors.torch:save_file", 4, "rust", full=True),
    _disk("eval.items", "eval", "cmkd.eval.modes:append_jsonl", 4, "oserror"),
]


@pytest.mark.parametrize(("name", "stage", "target", "at", "style"), FULL_DISK_POINTS)
def test_full_disk_stops_cleanly_and_the_rerun_finishes_identically(
    name: str,
    stage: str,
    target: str,
    at: int,
    style: str,
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_world(tiny_run, make_audio, monkeypatch)
    work, reference_work, outcome, reference_outcome, compare = _command(stage)
    expected = reference(stage, reference_work, reference_outcome)
    with monkeypatch.context() as disk:
        fill_disk_at(disk, target, at, style)
        full = _cli(work, capsys)
    record(faults=1)
    assert full.code == 2, full.err
    assert "no space left on device" in full.error and "re-run the same command" in full.error
    assert run_forked(work) == 0, f"{name}: the same command did not finish once space returned"
    found = compare(expected, outcome())
    record(lost=found.lost)
    assert found.lost == 0, found.notes


def _cli(work: Any, capsys: pytest.CaptureFixture[str]) -> CliResult:
    """Run a stage's `work` (a `cmkd.cli.main` call) in this process and capture what it printed."""
    capsys.readouterr()
    code = work()
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A tmpfs of a given size at <tmp>/disk (root only), resizable in place: `resize(bytes)`."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted: list[bool] = []

    def resize(size: int) -> Path:
        options = f"size={size}" if not mounted else f"remount,size={size}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(True)
        return mount_point

    yield resize
    if mounted:
        subprocess.run(["umount", str(mount_point)], check=False)


def _bytes_used(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@pytest.mark.reliability_full
@pytest.mark.parametrize("stage", ["prepare", "train", "eval"])
def test_a_real_full_disk_stops_cleanly_and_the_rerun_finishes_identically(
    stage: str,
    small_disk: Any,
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's output directory on a tmpfs half the size the run needs: whatever writer hits the wall first
    (work log, FLAC, safetensors, torch.save, metrics, TensorBoard) must end in one line, not a traceback."""
    make_world(tiny_run, make_audio, monkeypatch)
    _, reference_work, _, reference_outcome, compare = _command(stage)
    expected = reference(stage, reference_work, reference_outcome)
    measured = {"prepare": Path("prep_ref"), "train": Path("ref_train"), "eval": Path("ref_eval")}[stage]
    if not measured.exists():  # the cached reference ran in another test's directory: measure here
        assert run_forked(reference_work) == 0
    disk = small_disk(max(_bytes_used(measured) // 2, 16 * 1024))
    if stage == "prepare":
        write_prepare_config(str(disk / "prep"), "prepare_disk.yaml")
        work, outcome = (
            (lambda: main(["prepare", "prepare_disk.yaml"])),
            (lambda: prepare_outcome(disk / "prep")),
        )
    elif stage == "train":
        work, outcome = (lambda: main(train_args(str(disk / "run")))), (lambda: train_outcome(disk / "run"))
    else:
        work, outcome = (lambda: main(eval_args(str(disk / "run")))), (lambda: eval_outcome(disk / "run"))
    full = _cli(work, capsys)
    record(faults=1)
    assert full.code == 2, full.err[-3000:]
    assert "no space left on device" in full.error
    small_disk(64 * 1024 * 1024)  # space returns
    assert run_forked(work) == 0
    found = compare(expected, outcome())
    record(lost=found.lost)
    assert found.lost == 0, found.notes


# ---------------------------------------------------------------------------------------------------------------
# Runs that must refuse to go on, overwriting nothing
# ---------------------------------------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_non_finite_loss_stops_naming_step_and_items_and_keeps_the_last_checkpoint(
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(test_train covers a NaN at step 1.) Here the loss turns NaN at step 5 of a run with checkpoints at 2 and
    4: the error names step, channel and items, checkpoint 4 and the metrics of steps 1-4 stay as they were, and
    once the cause is gone the same command resumes from step 4 to the uninterrupted run's weights."""
    import cmkd.train.loop as loop

    make_world(tiny_run, make_audio, monkeypatch)
    work, reference_work, outcome, reference_outcome, compare = _command("train")
    expected = reference("train", reference_work, reference_outcome)
    real_loss = loop.chunked_kd_loss
    calls = {"n": 0}

    def diverging(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        parts = real_loss(*args, **kwargs)
        return dataclasses.replace(parts, total=parts.total * float("nan")) if calls["n"] >= 9 else parts

    with monkeypatch.context() as patch:
        patch.setattr(loop, "chunked_kd_loss", diverging)
        failed = _cli(work, capsys)
    record(faults=1)
    assert failed.code == 2
    assert re.search(r"non-finite loss at step 5, channel t2t, items \[q\d, q\d\]", failed.error), (
        failed.error
    )
    assert "step-000004" in failed.error
    run = Path("run")
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert not (run / "student").exists()
    assert [row["step"] for row in jsonl_lines(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert run_forked(work) == 0
    found = compare(expected, outcome())
    record(lost=found.lost)
    assert found.lost == 0, found.notes


def test_a_teacher_cache_that_does_not_match_the_run_is_refused_and_left_alone(
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_world(tiny_run, make_audio, monkeypatch)
    write_prepare_config("prep", "prepare.yaml")
    assert _cli(lambda: main(["prepare", "prepare.yaml"]), capsys).code == 0
    cache = _snapshot(Path("prep/teacher_logits"))
    assert cache
    cached = ["data.root=prep", "train.teacher_source=cache", "teacher.logits_top_k=8"]
    for wrong, named in (
        ("teacher.logits_top_k=4", "k is 8 but this run needs 4"),
        ("teacher.model=./lm", "teacher is 'lm' but this run needs './lm'"),
    ):
        refused = _cli(lambda wrong=wrong: main(train_args(f"run_{len(wrong)}", *cached, wrong)), capsys)
        record(faults=1)
        assert refused.code == 2 and "logit cache" in refused.error and named in refused.error, refused.err
        assert not Path(f"run_{len(wrong)}/checkpoints").exists()
    rebuilt = _cli(lambda: main(["prepare", "prepare.yaml", "teacher.logits_top_k=4"]), capsys)
    assert (
        rebuilt.code == 2 and "--overwrite" in rebuilt.error
    )  # a prepare with another k does not replace it
    assert _snapshot(Path("prep/teacher_logits")) == cache
    matching = _cli(lambda: main(train_args("run_ok", *cached, "train.steps=1")), capsys)
    assert matching.code == 0, matching.err  # the same cache, matched, trains


def test_checkpoints_of_another_config_are_refused_and_left_alone(
    tiny_run: dict[str, Path],
    tts_counter: Path,
    make_audio: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the run's config.yaml gone, the run-dir check still sees run outputs and refuses without writing a
    config.yaml of its own (which would claim the old checkpoints); the library path is guarded by the checkpoint's
    own config fingerprint. No checkpoint is touched either way."""
    make_world(tiny_run, make_audio, monkeypatch)
    assert _cli(lambda: main(train_args("run", "train.steps=2", "train.save_every=1")), capsys).code == 0
    Path("run/config.yaml").unlink()
    before = _snapshot(Path("run/checkpoints"))
    other = _cli(
        lambda: main(train_args("run", "train.steps=4", "train.save_every=1", "train.lr=0.5")), capsys
    )
    record(faults=1)
    assert other.code == 2 and "no config.yaml" in other.error and "--overwrite" in other.error
    assert not Path("run/config.yaml").exists()
    assert _snapshot(Path("run/checkpoints")) == before
    from cmkd.config import load_config
    from cmkd.stage_configs import TrainConfig
    from cmkd.train.loop import run_training

    cfg = load_config(
        TrainConfig, None, train_args("run", "train.steps=4", "train.save_every=1", "train.lr=0.5")[1:]
    )
    with pytest.raises(UserError, match="different training config"):
        run_training(cfg, Path("run"), progress=False)
    assert _snapshot(Path("run/checkpoints")) == before


def test_the_comparisons_notice_lost_duplicated_and_corrupt_items() -> None:
    """The fault tests are only as good as their comparisons: each must fail on what it exists to catch."""
    lines = b'{"id": "a"}\n{"id": "b"}\n'
    assert compare_prepare({"x.jsonl": lines}, {"x.jsonl": lines}).lost == 1  # no cache marker: incomplete
    marker = {"teacher_logits/build.json": b"{}"}
    assert compare_prepare({"x.jsonl": lines, **marker}, {"x.jsonl": lines, **marker}).lost == 0
    assert compare_prepare({"x.jsonl": lines, **marker}, {"x.jsonl": lines[:12], **marker}).lost >= 1  # lost
    assert compare_prepare({"x.jsonl": lines, **marker}, {"x.jsonl": lines + lines[12:], **marker}).lost >= 1
    assert compare_prepare({"a.flac": b"1", **marker}, {"a.flac": b"2", **marker}).lost == 1  # corrupt
    weights = {"w": torch.zeros(3)}
    rows = [{"step": step, "loss": 1.0, "tokens_per_s": 9.0} for step in (1, 2)]
    assert compare_train((weights, rows), ({"w": torch.zeros(3)}, rows), steps=2).lost == 0
    assert compare_train((weights, rows), ({"w": torch.full((3,), 1e-5)}, rows), steps=2).lost == 1
    assert compare_train((weights, rows), (weights, [*rows, rows[1]]), steps=2).lost == 1  # a duplicated line
    assert compare_train((weights, rows), (weights, rows[:1]), steps=2).lost == 1  # a lost line
    assert compare_train((weights, rows), (weights, [rows[0], {**rows[1], "loss": 1.1}]), steps=2).lost == 1
    items = {"m.jsonl": {("a", ""): {"response": "x", "kl": 0.5}, ("b", ""): {"response": "y", "kl": 0.5}}}
    scores = {"scores.json": {"n": 2}}
    assert compare_eval({**items, **scores}, {**items, **scores}).lost == 0
    lost = {"m.jsonl": {("a", ""): items["m.jsonl"][("a", "")]}}
    assert compare_eval({**items, **scores}, {**lost, **scores}).lost == 1
    changed = {"m.jsonl": {**items["m.jsonl"], ("b", ""): {"response": "z", "kl": 0.5}}}
    assert compare_eval({**items, **scores}, {**changed, **scores}).lost == 1


def test_a_torn_or_glued_line_is_caught(tmp_path: Path) -> None:
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"id": "a"}\n{"id": "b"')
    with pytest.raises(AssertionError, match="partial last line"):
        jsonl_lines(torn)
    torn.write_bytes(b'{"id": "a"}{"id": "b"}\n')
    with pytest.raises(AssertionError, match="corrupt line"):
        jsonl_lines(torn)
