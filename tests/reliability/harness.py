"""Shared machinery of the reliability suite: the session counters, the in-process CLI, and fork-and-kill.

Why fork: a fresh interpreter pays ~6 s of imports per run, and a fault point needs two or three runs. A forked
child shares the parent's imports and tiny models, arms one patch (the kill point) and runs the real code path; its
SIGKILL is as real as `kill -9` from a shell: no `finally`, no atexit, no flush. Points are calls of named
functions (`KillPoint`), so every run of the suite kills at the same place.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cmkd.data.jsonl_io import dumps_line

# ---------------------------------------------------------------------------------------------------------------
# Counters behind the session summary line (conftest.pytest_terminal_summary prints them)
# ---------------------------------------------------------------------------------------------------------------

COUNTS: Counter[str] = Counter()
"""faults: kills and full disks injected; inputs: bad inputs tried; lost: items lost, duplicated or corrupted."""


def record(faults: int = 0, inputs: int = 0, lost: int = 0) -> None:
    COUNTS["faults"] += faults
    COUNTS["inputs"] += inputs
    COUNTS["lost"] += lost


# ---------------------------------------------------------------------------------------------------------------
# The real CLI, in process
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("cmkd: error:")]

    @property
    def error(self) -> str:
        """The one error line (asserted to be exactly one), without the `cmkd: error: ` prefix."""
        assert len(self.error_lines) == 1, f"want one error line, got stderr:\n{self.err}"
        assert "Traceback" not in self.err, self.err
        return self.error_lines[0].removeprefix("cmkd: error: ")


def run_cli(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> CliResult:
    """`cmkd ARGS` through `cmkd.cli.main`; an exception escaping main (a traceback for a user) fails the test."""
    from cmkd.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


# ---------------------------------------------------------------------------------------------------------------
# Kill points and the forked run
# ---------------------------------------------------------------------------------------------------------------


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _resolve(target: str) -> tuple[Any, str]:
    """'pkg.module:Class.attr' -> (the object holding attr, 'attr')."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


@dataclass(frozen=True)
class KillPoint:
    """SIGKILL the run at the `at`-th call of `target`: before it runs, after it returns, or half-way through a
    write (`torn`: the first half of the bytes the call would append reach the file, then the kill).

    `target` names where the code under test looks the function up ('cmkd.train.state:torch.save'); `torn` needs
    `torn_path`, which maps the call's arguments to the file and the bytes it appends."""

    name: str
    target: str
    at: int
    when: str = "after"
    why: str = ""
    torn_path: Callable[..., tuple[Path, bytes]] | None = None

    def arm(self) -> None:
        """Install the kill in this (child) process; never call it in the test process itself.

        `env:NAME` targets set NAME=at instead, for a killer outside Python (test_prepare's fake TTS command
        SIGKILLs its parent on its at-th call)."""
        if self.target.startswith("env:"):
            os.environ[self.target.removeprefix("env:")] = str(self.at)
            return
        owner, attr = _resolve(self.target)
        original = getattr(owner, attr)
        calls = {"n": 0}
        point = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            hit = calls["n"] == point.at
            if hit and point.when == "before":
                _kill()
            if hit and point.when == "torn":
                assert point.torn_path is not None, point.name
                path, data = point.torn_path(*args, **kwargs)
                with open(path, "ab") as handle:
                    handle.write(data[: max(1, len(data) // 2)])
                    handle.flush()
                    os.fsync(handle.fileno())
                _kill()
            result = original(*args, **kwargs)
            if hit and point.when == "after":
                _kill()
            return result

        setattr(owner, attr, wrapper)


def jsonl_payload(path: Path, rows: Sequence[dict[str, Any]]) -> tuple[Path, bytes]:
    """What an append of `rows` to `path` writes (for torn writes)."""
    return Path(path), b"".join(dumps_line(row) for row in rows)


def run_forked(work: Callable[[], Any], *arms: Callable[[], None], timeout_s: int = 300) -> int:
    """Run `work()` in a forked child after `arms` (kill points, patches); return its exit code, -9 if killed.

    The child never returns into pytest: it leaves with os._exit, so no teardown runs twice. An int returned by
    `work` (a CLI exit code) is the child's exit code; an exception is printed and exits 1.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(timeout_s)  # a hung child dies with SIGALRM instead of hanging the suite
            for arm in arms:
                arm()
            result = work()
            code = result if isinstance(result, int) else 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ---------------------------------------------------------------------------------------------------------------
# Comparing a resumed run with an uninterrupted one
# ---------------------------------------------------------------------------------------------------------------

_TIMING_KEYS = ("seconds", "cpu_seconds", "tokens_per_s", "elapsed")


def strip_timing(value: Any) -> Any:
    """`value` without wall/CPU-time fields, which differ between any two runs."""
    if isinstance(value, dict):
        return {
            key: strip_timing(item)
            for key, item in value.items()
            if not any(key == t or key.endswith(f"_{t}") or key.startswith(f"{t}") for t in _TIMING_KEYS)
        }
    if isinstance(value, list):
        return [strip_timing(item) for item in value]
    return value


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file as an object; a line that does not parse (torn, glued) fails the test."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path}: partial last line"
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise AssertionError(f"{path}:{number}: corrupt line ({err}): {line[:120]!r}") from None
    return rows


@dataclass
class Differences:
    """What a resumed run got wrong compared with the uninterrupted one; `lost` counts items, not files."""

    lost: int = 0
    notes: list[str] | None = None

    def add(self, count: int, note: str) -> None:
        if count:
            self.lost += count
            self.notes = [*(self.notes or []), note]


def compare_files(reference: dict[str, bytes], resumed: dict[str, bytes]) -> Differences:
    """Byte-for-byte; a JSONL file's differing lines count one lost item each, any other file counts one."""
    found = Differences()
    for name in sorted(reference.keys() | resumed.keys()):
        want, got = reference.get(name), resumed.get(name)
        if want == got:
            continue
        if want is None or got is None:
            found.add(1, f"{name}: {'missing' if got is None else 'extra'} file")
        elif name.endswith(".jsonl"):
            want_lines, got_lines = want.splitlines(), got.splitlines()
            changed = len(set(want_lines) ^ set(got_lines)) + abs(len(got_lines) - len(set(got_lines)))
            found.add(max(changed, 1), f"{name}: {changed} line(s) differ")
        else:
            found.add(1, f"{name}: bytes differ")
    return found


def compare_weights(reference: dict[str, torch.Tensor], resumed: dict[str, torch.Tensor]) -> Differences:
    found = Differences()
    found.add(len(reference.keys() ^ resumed.keys()), f"keys differ: {reference.keys() ^ resumed.keys()}")
    for key in reference.keys() & resumed.keys():
        if reference[key].shape != resumed[key].shape:
            found.add(1, f"{key}: shape")
            continue
        diff = (
            (reference[key].double() - resumed[key].double()).abs().max().item()
            if reference[key].numel()
            else 0
        )
        if not math.isfinite(diff) or diff > 1e-6:
            found.add(1, f"{key}: max |diff| {diff:g}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# A full disk, simulated at one writer
# ---------------------------------------------------------------------------------------------------------------


def disk_full_error(what: str, style: str = "oserror") -> Exception:
    """What a writer raises on a full disk: Python's OSError; torch.save's RuntimeError raised while the file
    object's OSError is handled (`torch`); safetensors' Rust error, which only says so in its text (`rust`)."""
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
    if style == "oserror":
        return error
    if style == "torch":
        wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        wrapped.__context__ = error
        return wrapped
    return RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, target: str, at: int, style: str = "oserror") -> None:
    """From the `at`-th call on, `target` fails as on a full disk (until monkeypatch undoes it: space returns)."""
    owner, attr = _resolve(target)
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= at:
            raise disk_full_error(str(args[0]) if args and isinstance(args[0], str | Path) else target, style)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
