"""What every benchmark report carries, so a number can be compared with a reader's own machine.

Shared by the loss, teacher-cost and channel benchmarks: machine facts (cores, CPU model, RAM, versions), the load
average before and after (the reference machine is a shared 2-core box, so a slow row is often someone else's job),
a child process's peak RSS, the exact command that produced the table, and a training run of the real loop with
its teacher side timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmkd.data.demo_questions import DemoQuestion

RESULTS_DIR = Path(__file__).parent / "results"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in this process and every child (0: torch's default, OMP_NUM_THREADS or the cores); "
        "1 is steadier when other jobs share the cores, since threads that wait on each other stall there",
    )


def apply_threads(threads: int) -> None:
    """Set torch's thread count here and, through OMP_NUM_THREADS, in every child started after this call."""
    if threads > 0:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def machine_info() -> dict[str, str]:
    """Facts measured at the start of a run; `render_machine` adds the load average at its end."""
    import torch

    return {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "RAM": _ram_gib(),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "load average (1/5/15 min) at start": load_average(),
    }


def render_machine(info: dict[str, str], command: str) -> list[str]:
    """The report's closing section: the command to reproduce it, then the machine."""
    lines = ["## Command and machine", "", f"- command: `{command}`"]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines.append(f"- load average (1/5/15 min) at end: {load_average()}")
    return lines


def command_line() -> str:
    return " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])


def generated_line(command: str) -> str:
    return f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `{command}`."


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: VmHWM on Linux, else getrusage's ru_maxrss.

    Why not ru_maxrss first: Linux keeps it across execve and starts a forked child at the parent's RSS, so a
    child started by a parent that holds a model would report the parent's memory. VmHWM is the high-water mark
    of this process image alone.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def spread_questions(n_questions: int) -> list[DemoQuestion]:
    """Every m-th demo training question: the file is grouped by category, so a prefix would be all capitals."""
    from cmkd.data.demo_questions import load_demo_questions

    questions = load_demo_questions("train")
    step = max(1, len(questions) // n_questions)
    return questions[::step][:n_questions]


def write_report(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print()
    print(text)
    print(f"written to {path}")


# ---------------------------------------------------------------------------------------------------------------
# The real training loop with its teacher side timed (teacher-cost and channel benchmarks)
# ---------------------------------------------------------------------------------------------------------------


class TimedTeacherRows:
    """The loop's teacher-rows provider, timed per call; `passes_per_call` > 1 re-runs it as a per-channel loop would.

    Installed by replacing `cmkd.train.loop.build_teacher_rows` in a child process: that is the loop's one seam for
    the teacher side, so the loop itself runs unchanged and its own tokens/s stays the measure of a step.
    """

    def __init__(self, provider: Any, passes_per_call: int) -> None:
        self.provider = provider
        self.passes_per_call = passes_per_call
        self.seconds: list[float] = []  # per call (one call per micro-batch)
        self.response_tokens: list[int] = []  # rows served per call: ŷ tokens + end of turn

    @property
    def counter(self) -> Any:
        """The provider's own pass counter, which `run_training` reports as `teacher_examples`."""
        return self.provider.counter

    def __call__(self, examples: Sequence[Any]) -> Any:
        start = time.perf_counter()
        for _ in range(self.passes_per_call):
            rows = self.provider(examples)
        self.seconds.append(time.perf_counter() - start)
        self.response_tokens.append(sum(len(e.response_ids) + 1 for e in examples))
        return rows


@dataclass(frozen=True)
class TimedRun:
    """What one training child reports (grad_accum = 1, one process: one teacher call per step)."""

    tokens_per_s: list[float]  # the loop's metric per step: response tokens x channels / step wall time
    teacher_seconds: list[float]  # per step: the teacher pass, or the cache read
    response_tokens: list[int]  # per step
    teacher_examples: int  # the provider's counter over the run
    teacher_calls: int  # provider calls by the loop (micro-batches)
    peak_rss: int  # bytes, this process image (models included)

    def step_seconds(self, channels: int) -> list[float]:
        return [
            tokens * channels / rate
            for tokens, rate in zip(self.response_tokens, self.tokens_per_s, strict=True)
        ]


def run_timed_training(overrides: list[str], passes_per_call: int) -> TimedRun:
    """`run_training` on a TrainConfig built from dotted overrides, teacher side timed; call in a child process."""
    from cmkd.config import load_config
    from cmkd.stage_configs import TrainConfig
    from cmkd.train import loop

    wrappers: list[TimedTeacherRows] = []
    build_teacher_rows = loop.build_teacher_rows

    def timed_build_teacher_rows(cfg: TrainConfig, student: Any, teacher: Any = None) -> tuple[Any, int]:
        provider, vocab_rows = build_teacher_rows(cfg, student, teacher)
        wrappers.append(TimedTeacherRows(provider, passes_per_call))
        return wrappers[-1], vocab_rows

    loop.build_teacher_rows = timed_build_teacher_rows  # this (child) process only
    cfg = load_config(TrainConfig, None, overrides)
    result = loop.run_training(cfg, cfg.run.out_dir, progress=False)
    metrics = [json.loads(line) for line in (cfg.run.out_dir / "metrics.jsonl").read_text().splitlines()]
    (wrapper,) = wrappers
    return TimedRun(
        tokens_per_s=[row["tokens_per_s"] for row in metrics],
        teacher_seconds=wrapper.seconds,
        response_tokens=wrapper.response_tokens,
        teacher_examples=result.teacher_examples,
        teacher_calls=len(wrapper.seconds),
        peak_rss=peak_rss_bytes(),
    )


def print_run(run: TimedRun) -> None:
    """The child's last stdout line, read back by `run_training_child`."""
    print(json.dumps(asdict(run)))


def run_training_child(script: str, child_args: list[str], what: str) -> TimedRun:
    """Run `script --child ...` in a fresh process (offline) and parse its TimedRun."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, script, "--child", *child_args], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return TimedRun(**json.loads(done.stdout.strip().splitlines()[-1]))
