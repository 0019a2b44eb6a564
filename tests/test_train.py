"""The distillation loop on tiny models: it learns, it resumes exactly, it runs on 2 processes, it refuses bad runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from cmkd.config import load_config
from cmkd.data.records import PairedRecord, SpeechClip, write_manifest
from cmkd.errors import UserError
from cmkd.stage_configs import TrainConfig
from cmkd.train.examples import micro_batches
from cmkd.train.loop import run_training

QUESTIONS = [
    ("What is the capital of france?", "paris is the capital"),
    ("What is two plus two?", "four"),
    ("What sounds like a cat?", "a cat sounds like a cat"),
    ("Is the sun hot?", "yes the sun is hot"),
    ("What is water?", "water is blue and green"),
    ("What is the opposite of cold?", "hot"),
]


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_lm, tiny_tokenizer, tiny_whisper, make_audio) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Tiny models saved as local checkpoints + a manifest with audio: the same inputs `cmkd train` reads."""
    lm_dir, whisper_dir, data = tmp_path / "lm", tmp_path / "whisper", tmp_path / "data"
    tiny_lm.save_pretrained(lm_dir)
    tiny_tokenizer.save_pretrained(lm_dir)
    tiny_whisper.save_pretrained(whisper_dir)
    records = []
    for index, (question, answer) in enumerate(QUESTIONS):
        audio_rel = f"audio/q{index}.flac"
        (data / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(data / audio_rel, make_audio(0.6 + 0.1 * index, seed=index), 16000)
        records.append(
            PairedRecord(
                id=f"q{index}",
                prompt=question,
                speech=[SpeechClip(audio=audio_rel, sr=16000, source="test", voice="noise")],
                target=answer,
                teacher_response=answer,
            )
        )
    write_manifest(data / "train.jsonl", records)
    return {"lm": lm_dir, "whisper": whisper_dir, "data": data, "root": tmp_path}


def overrides(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"run.out_dir={out}",
        f"data.root={paths['data']}",
        f"student.lm={paths['lm']}",
        f"student.encoder={paths['whisper']}",
        f"teacher.model={paths['lm']}",
        "student.projector.stack=4",
        "student.projector.hidden=32",
        "train.teacher_source=online",
        "train.batch_size=2",
        "train.warmup_steps=0",
        "train.lr=0.01",
        "train.log_every=1",
        "teacher.system_prompt=Be brief.",
        *extra,
    ]


def test_training_lowers_the_loss(tiny_run: dict[str, Path]) -> None:
    cfg = load_config(
        TrainConfig,
        None,
        overrides(
            tiny_run,
            tiny_run["root"] / "run",
            "train.steps=12",
            "train.lr=0.05",
            "train.schedule=constant",
            "student.lm_mode=lora",
            "train.lora_lr=0.01",
        ),
    )
    result = run_training(cfg, cfg.run.out_dir, progress=False)
    rows = [json.loads(line) for line in (cfg.run.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    first, final = np.mean([r["s2t/loss"] for r in rows[:3]]), np.mean([r["s2t/loss"] for r in rows[-3:]])
    assert final < 0.8 * first, (first, final)
    # Both channels share one teacher pass per example: 12 steps × 2 examples, not twice that.
    assert result.teacher_examples == 12 * 2
    assert (result.student_dir / "trainable.safetensors").is_file()
    saved = load_file(str(result.student_dir / "trainable.safetensors"))
    assert saved and all(
        key.startswith("projector.") or "lora_" in key for key in saved
    )  # only trainables saved
    # At step 1 the LoRA student (B = 0) in text mode equals the teacher: T→T KD of a model against itself is ~0.
    assert rows[0]["t2t/kd"] < 1e-6
    assert (
        rows[-1]["t2t/kd"] > rows[0]["t2t/kd"]
    )  # CE on these hand-written (non-teacher) targets pulls it away


def test_gold_targets_with_cached_teacher_are_refused(tiny_run: dict[str, Path]) -> None:
    cfg = load_config(
        TrainConfig,
        None,
        overrides(
            tiny_run,
            tiny_run["root"] / "run",
            "train.steps=1",
            "loss.ce_target=gold",
            "train.teacher_source=cache",
        ),
    )
    with pytest.raises(UserError, match="gold targets with kd_weight > 0 need train.teacher_source=online"):
        run_training(cfg, cfg.run.out_dir, progress=False)


def test_micro_batches_partition_the_stream_across_ranks() -> None:
    one = micro_batches(0, n_examples=5, batch_size=2, grad_accum=2, rank=0, world_size=1, seed=3)
    two = [
        micro_batches(0, n_examples=5, batch_size=1, grad_accum=2, rank=r, world_size=2, seed=3)
        for r in (0, 1)
    ]
    flat_one = sorted(i for batch in one for i in batch)
    flat_two = sorted(i for rank in two for batch in rank for i in batch)
    assert flat_one == flat_two  # the same global examples whatever the number of processes
    assert len(flat_one) == 4


def _cmkd(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "cmkd.cli", *args], env=env, stderr=subprocess.PIPE)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "trainable.safetensors"))


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_run: dict[str, Path]) -> None:
    common = ["train.steps=8", "train.save_every=2", "student.lm_mode=lora", "train.lora_lr=0.01"]
    straight = tiny_run["root"] / "straight"
    proc = _cmkd(["train", *overrides(tiny_run, straight, *common)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode() if proc.stderr else ""

    killed = tiny_run["root"] / "killed"
    proc = _cmkd(["train", *overrides(tiny_run, killed, *common)])
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-000004").exists():  # kill -9 somewhere after the 2nd checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()
    resumed = _cmkd(["train", *overrides(tiny_run, killed, *common)])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode() if resumed.stderr else ""

    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys() and any("lora_" in key for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # no duplicated or missing log lines after the resume
    losses_a = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    losses_b = [json.loads(line)["loss"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses_a, losses_b, atol=1e-6)


def test_two_processes_match_one(tiny_run: dict[str, Path]) -> None:
    """`accelerate launch` with 2 CPU processes trains the same global batch as one process."""
    common = ["train.steps=3", "train.teacher_source=online"]
    single = tiny_run["root"] / "single"
    proc = _cmkd(["train", *overrides(tiny_run, single, *common, "train.batch_size=4")])
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode() if proc.stderr else ""
    double = tiny_run["root"] / "double"
    launch = [
        # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs it starts CPU processes (gloo).
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cmkd.cli",
        "train",
        *overrides(tiny_run, double, *common, "train.batch_size=2"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    # Same global losses (logged after an all-reduce) and the same weights, up to float summation order.
    one = [json.loads(line)["loss"] for line in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (double / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(one, two, rtol=1e-5)
    a, b = _final_weights(single), _final_weights(double)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)


def test_non_finite_loss_stops_naming_step_and_items(tiny_run: dict[str, Path]) -> None:
    from cmkd.models.build import build_student

    cfg = load_config(
        TrainConfig,
        None,
        overrides(tiny_run, tiny_run["root"] / "nan", "train.steps=3", "train.save_every=1"),
    )
    student = build_student(cfg.student)
    with torch.no_grad():
        for param in student.projector.parameters():
            param.fill_(float("nan"))  # a diverged connector: every speech position is NaN
    with pytest.raises(UserError, match=r"non-finite loss at step 1, channel s2t, items \[q\d, q\d\]"):
        run_training(cfg, cfg.run.out_dir, student=student, progress=False)
    assert not (cfg.run.out_dir / "checkpoints" / "step-000001").exists()  # nothing bad was saved


def test_activation_checkpointing_trains_the_same_steps(tiny_run: dict[str, Path]) -> None:
    """Recomputing activations changes memory, not maths: the same losses and weights as without it."""
    results = {}
    for flag in ("false", "true"):
        cfg = load_config(
            TrainConfig,
            None,
            overrides(tiny_run, tiny_run["root"] / f"ckpt-{flag}", "train.steps=3", "student.lm_mode=lora",
                      f"train.activation_checkpointing={flag}"),
        )  # fmt: skip
        run_training(cfg, cfg.run.out_dir, progress=False)
        rows = [json.loads(line) for line in (cfg.run.out_dir / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(str(cfg.run.out_dir / "student" / "trainable.safetensors"))
        results[flag] = ([row["loss"] for row in rows if "loss" in row], weights)
    np.testing.assert_allclose(results["true"][0], results["false"][0], rtol=1e-5)
    for name, tensor in results["false"][1].items():
        torch.testing.assert_close(results["true"][1][name], tensor, rtol=1e-5, atol=1e-6)
