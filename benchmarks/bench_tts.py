"""TTS speed: times real time per backend and worker count, measured side by side in one run.

Claim checked: how long `cmkd prepare` spends speaking the questions (design §3 quotes hibari at about 67x real
time on 2 cores). Each configuration runs `synthesize_many` end to end into a fresh directory (worker start-up,
model load, synthesis, resampling and FLAC writes included: what a user waits for), each in a fresh process so
every configuration pays the model load once, as one `cmkd prepare` run does. Configurations are
interleaved over several rounds so a burst of load from another process hits all of them alike; the median
round is reported.

    python benchmarks/bench_tts.py                      # 40 sentences, hibari + espeak, 1 and 2 workers
    python benchmarks/bench_tts.py --rounds 1 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from cmkd.data.tts import TTSJob, synthesize_many

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "What is seven times eight?",
    "Name a primary colour.", "What is the opposite of hot?", "Which planet is closest to the sun?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?", "Is a tomato a fruit?",
    "What colour is the sky on a clear day?", "How many days are in a leap year?", "What is the capital of Japan?",
    "What gas do plants take in from the air?", "What is twelve plus nine?", "Which animal is known as the king "
    "of the jungle?", "What is the largest ocean on Earth?", "How many continents are there?",
    "What is the opposite of early?", "Repeat after me: the quick brown fox.", "What is the capital of Canada?",
    "Which metal is liquid at room temperature?", "How many hours are in a day?", "What do bees make?",
    "What is the freezing point of water in Fahrenheit?", "Spell the word cat.", "What is the capital of Italy?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?", "What is the opposite of up?",
    "How many sides does a hexagon have?", "What language is spoken in Brazil?", "What is nine minus four?",
    "Which bird cannot fly but runs very fast?", "What is the tallest mountain in the world?",
    "Do fish breathe through gills?", "What is the capital of Egypt?", "What colour are bananas when ripe?",
    "How many minutes are in an hour?", "What is the chemical symbol for gold?", "Which season comes after winter?",
    "What is the square root of sixty-four?",
]  # fmt: skip
VOICE_OF = {"hibari": "heart", "espeak": "en-us+m3"}


@dataclass
class Measurement:
    backend: str
    workers: int
    wall_s: list[float]
    audio_s: float
    failures: int


def machine_info() -> dict[str, str]:
    """What a reader needs to compare these numbers with their own: cores, CPU, versions, load."""
    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    espeak = shutil.which("espeak-ng")
    espeak_version = (
        subprocess.run([espeak, "--version"], capture_output=True, text=True, check=False).stdout.split(
            "Data"
        )[0]
        if espeak
        else "not installed"
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "torch": version("torch"),
        "hibari-tts": version("hibari-tts"),
        "onnxruntime": version("onnxruntime"),
        "espeak-ng": espeak_version.strip(),
        "load average (1/5/15 min) at start": " / ".join(f"{value:.2f}" for value in os.getloadavg()),
    }


def run_once(backend: str, workers: int, sentences: int, scratch: Path) -> tuple[float, float, int]:
    """One end-to-end synthesize_many in a fresh Python process: (wall seconds, audio seconds, failed jobs).

    A fresh process per measurement, because hibari's model stays loaded in a process after its first use: in
    one long-lived process, 1 worker would skip the model load from round 2 on while pool workers never do.
    """
    out_dir = Path(tempfile.mkdtemp(prefix=f"{backend}-w{workers}-", dir=scratch))
    child = [sys.executable, __file__, "--child", backend, str(workers), str(sentences), str(out_dir)]
    done = subprocess.run(child, capture_output=True, text=True, check=True)
    shutil.rmtree(out_dir)
    wall, audio, failed = done.stdout.split()[-3:]
    return float(wall), float(audio), int(failed)


def child_run(backend: str, workers: int, sentences: int, out_dir: Path) -> None:
    """The measured part: prints "wall audio failed" for the parent."""
    texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(sentences)]
    jobs = [
        TTSJob(f"q{i}", text, backend, VOICE_OF[backend], out_dir / f"q{i}.flac")
        for i, text in enumerate(texts)
    ]
    start = time.perf_counter()
    results = synthesize_many(jobs, workers=workers, progress=False)
    wall = time.perf_counter() - start
    print(wall, sum(r.seconds for r in results), sum(r.error is not None for r in results))


def render(
    measurements: list[Measurement], info: dict[str, str], command: str, sentences: int, rounds: int
) -> str:
    lines = [
        "# TTS speed (times real time)",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `{command}`.",
        "",
        f"{sentences} short questions per configuration, one `synthesize_many` call timed end to end in a fresh",
        "process (worker start-up and model load included, Python start-up and `import cmkd` not), 16 kHz FLAC",
        f"out; median of {rounds} interleaved round(s). ×RT = seconds of audio per second of wall-clock;",
        "speed-up is against 1 worker of the same backend. The best round is the least disturbed by other load",
        "on a shared machine; compare the load averages below.",
        "",
        "| backend | voice | workers | audio s | wall s (median) | wall s (all rounds) | ×RT (median) | ×RT (best) "
        "| speed-up (median) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = {m.backend: statistics.median(m.wall_s) for m in measurements if m.workers == 1}
    for m in measurements:
        wall = statistics.median(m.wall_s)
        speedup = f"{single[m.backend] / wall:.2f}x" if m.backend in single else "-"
        rounds_text = ", ".join(f"{w:.2f}" for w in m.wall_s)
        lines.append(
            f"| {m.backend} | {VOICE_OF[m.backend]} | {m.workers} | {m.audio_s:.1f} | {wall:.2f} | {rounds_text} "
            f"| {m.audio_s / wall:.1f} | {m.audio_s / min(m.wall_s):.1f} | {speedup} | {m.failures} |"
        )
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines.append(f"- load average (1/5/15 min) at end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=40, help="how many questions (cycled past 40)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved repetitions; the median is reported"
    )
    parser.add_argument("--backends", default="hibari,espeak", help="comma-separated: hibari, espeak")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tts.md")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.child:
        child_run(args.child[0], int(args.child[1]), int(args.child[2]), Path(args.child[3]))
        return
    backends = [b for b in args.backends.split(",") if b != "espeak" or shutil.which("espeak-ng")]
    configs = [(backend, int(w)) for backend in backends for w in args.workers.split(",")]
    info = machine_info()
    measurements = {config: Measurement(config[0], config[1], [], 0.0, 0) for config in configs}
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-tts-") as scratch:
        for round_index in range(args.rounds):
            for config in configs:
                wall, audio, failed = run_once(config[0], config[1], args.sentences, Path(scratch))
                entry = measurements[config]
                entry.wall_s.append(wall)
                entry.audio_s, entry.failures = audio, max(entry.failures, failed)
                print(f"round {round_index + 1}: {config[0]:7s} workers={config[1]}  {wall:6.2f} s  "
                      f"{audio / wall:6.1f}x RT", flush=True)  # fmt: skip
    command = " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])
    report = render(list(measurements.values()), info, command, args.sentences, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    print()
    print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
