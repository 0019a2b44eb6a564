"""`cmkd.eval.report.build_report`: Markdown, JSON and PNGs from eval runs, honest CI wording, closure."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from cmkd.errors import UserError
from cmkd.eval.report import NOT_DISTINGUISHABLE, build_report, ci_text
from cmkd.eval.runner import run_eval
from cmkd.models.teacher import TextTeacher
from test_eval_runner import FakeASR, make_config, write_demo_manifest


@pytest.fixture
def two_runs(
    tmp_path: Path,
    make_audio: Callable[..., np.ndarray],
    make_student: Any,
    tiny_lm: Any,
    tiny_tokenizer: Any,
) -> tuple[Path, Path]:
    """'before' (an untrained stack-2 student) and 'after' (the default tiny student), same items and teacher."""
    root = tmp_path / "data"
    write_demo_manifest(root, make_audio)
    teacher = TextTeacher(tiny_lm, tiny_tokenizer)
    dirs = []
    for name, student in (("before", make_student(stack=2)), ("after", make_student())):
        run_dir = tmp_path / "runs" / name
        extra = {"untrained": make_student(stack=2)} if name == "after" else None
        run_eval(make_config(root, run_dir), run_dir, student=student, teacher=teacher, extra_students=extra,
                 asr=FakeASR(), progress=False)  # fmt: skip
        dirs.append(run_dir)
    log = [{"step": s, "loss": 3.0 / s, "ce": 2.0 / s, "kd": 1.0 / s, "channel": ch, "tokens_per_s": 150.0 + s}
           for s in range(1, 11) for ch in ("t2t", "s2t")]  # fmt: skip
    (tmp_path / "runs" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    return dirs[0], dirs[1]


def test_report_writes_markdown_json_and_plots(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    console = Console(record=True, width=140)
    result = build_report(list(two_runs), out, console=console)
    markdown = result.markdown.read_text(encoding="utf-8")
    for section in (
        "## Runs",
        "## Scores per subset (`score`)",
        "## Forgetting and modality gap",
        "## Modes: scores, teacher-forced metrics, ASR, time",
        "## Item-level flips (McNemar)",
        "## Before / after: gap closure",
        "## Skipped",
        "## Training curves",
        "## Plots",
    ):
        assert section in markdown, section
    assert "Overall = unweighted mean over the 3 subsets: capitals, arithmetic, colors." in markdown
    assert "### before -> after" in markdown and "after: untrained -> student" in markdown
    names = {p.name for p in result.plots}
    assert names - {"gaps_agree.png"} == {"scores.png", "gaps.png", "training_0.png", "training_1.png"}
    for image in result.plots:
        assert image.read_bytes().startswith(b"\x89PNG") and image.stat().st_size > 10_000
    payload = json.loads(result.json.read_text(encoding="utf-8"))
    assert [run["label"] for run in payload["runs"]] == ["before", "after"]
    assert set(payload["closure"]["gaps"]) == {"forgetting", "modality_gap", "total_gap"}
    terminal = console.export_text()
    assert "student.speech" in terminal and "F (forgetting)" in terminal


def test_ci_including_zero_is_called_indistinguishable() -> None:
    assert ci_text(-2.0, {"low": -5.0, "high": 1.0}).endswith(f"({NOT_DISTINGUISHABLE})")
    assert ci_text(0.0, {"low": 0.0, "high": 0.0}).endswith(f"({NOT_DISTINGUISHABLE})")
    assert NOT_DISTINGUISHABLE not in ci_text(12.5, {"low": 4.0, "high": 20.0})
    assert ci_text(12.5, {"low": 4.0, "high": 20.0}) == "+12.5 [+4.0, +20.0]"


def test_report_of_a_directory_without_scores_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `cmkd eval`"):
        build_report([tmp_path], tmp_path / "out", console=Console(quiet=True))
