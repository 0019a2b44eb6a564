"""What every benchmark report carries, so a number can be compared with a reader's own machine.

Shared by the loss, teacher-cost and channel benchmarks: machine facts (cores, CPU model, RAM, versions), the load
average before and after (the reference machine is a shared 2-core box, so a slow row is often someone else's job),
a child process's peak RSS, and the exact command that produced the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

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
