"""Fixtures of the reliability suite, and the summary line the issue asks for at the end of every session.

The tiny models, audio and data layouts are the ones the stage tests already build (tests/conftest.py,
test_prepare.py, test_train.py, test_eval_runner.py); they are imported here, not rebuilt.
"""

from __future__ import annotations

import pytest

from test_prepare import tts_counter  # noqa: F401  (a fixture, reused: the fake TTS's call counter)
from test_train import tiny_run  # noqa: F401  (a fixture, reused: tiny model dirs + a manifest with audio)

from .bad_inputs import CASES, DOC_PATH, write_doc_if_asked
from .harness import COUNTS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`reliability_full` tests (all kill points, random kills, a real full disk) run only when the marker
    expression names them (`make reliability`), so plain `pytest` and `-m "not slow"` stay fast."""
    if "reliability_full" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long fault-injection loop: run `make reliability`")
    for item in items:
        if item.get_closest_marker("reliability_full"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    """'reliability: faults injected N, bad inputs tried M, items lost L' whenever a reliability test ran; with
    CMKD_WRITE_BAD_INPUT_DOC=1 and every case observed and passing, docs/bad-input.md is rewritten too."""
    if not COUNTS:
        return
    terminalreporter.write_line(
        f"reliability: faults injected {COUNTS['faults']}, bad inputs tried {COUNTS['inputs']}, "
        f"items lost {COUNTS['lost']}"
    )
    if write_doc_if_asked(CASES, all_passed=exitstatus == 0):
        terminalreporter.write_line(f"reliability: wrote {DOC_PATH} ({len(CASES)} cases)")
