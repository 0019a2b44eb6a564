"""`cmkd demo --quick` end to end on the real embedded models: the structure of what it writes, not its values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cmkd.cli", "demo", "--quick", "--out-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "report:" in result.stdout

    for stage in ("stage_a", "stage_b"):
        assert (out / stage / "student" / "trainable.safetensors").is_file()
        assert (out / stage / "metrics.jsonl").read_text().strip()
        assert (out / stage / "config.yaml").is_file()
    assert (out / "data" / "train.jsonl").is_file() and (out / "data" / "stats.md").is_file()

    scores = json.loads((out / "eval" / "scores.json").read_text())
    modes = set(scores["modes"])
    expected = {"teacher.text", "student.text", "student.speech", "cascade.asr", "student.mismatched"}
    expected |= {"stage_a.text", "stage_a.speech", "untrained.speech"}
    assert expected <= modes, modes
    assert scores["subsets"], "overall must list the subsets it averages"

    report = (out / "report" / "report.md").read_text()
    for section in ("## Runs", "## Forgetting and modality gap", "teacher.text", "student.speech"):
        assert section in report
    for image in ("scores.png", "gaps.png"):
        assert (out / "report" / image).stat().st_size > 10_000
