"""Eval: batched generation vs one question at a time, through the eval runner, on the demo held-out questions.

Claim checked (issue 8, item 6): `cmkd eval` answers ≥ 3x more questions per second with batched generation
(left padding, one `generate` per batch with a KV cache) than one by one. Both variants run `run_eval` itself
(the runner's own generation path: `run_batch` -> `generate_ids`), changing only `eval.batch_size`: the eval
default (16) vs 1. The student is the demo's (Whisper tiny.en + posterior connector + SmolLM2-135M-Instruct with
LoRA r = 8, untrained: generation costs the same for trained weights, up to answer lengths), the teacher SmolLM2;
greedy, ≤ 24 new tokens (the demo's). Modes: teacher on the text, student on the text, student on the hibari clip
(speech inputs from the posterior feature cache, built here as `cmkd prepare` builds it, so the speech mode
measures generation, not Whisper; bench_feature_cache.py measures that part). Teacher-forced KL/NLL, the ASR
cascade and the mismatched-audio control are off: they are not generation.

questions/s = items / Σ of the per-item wall seconds the runner records (each batch's wall time split over its
items), per mode; model loading is outside it. Each variant runs in its own process (peak RSS its own),
interleaved over rounds. Greedy answers can differ between a batch and a single question (padding changes the
floating-point sums); the share of identical answers is reported.

    python benchmarks/bench_eval.py --threads 1                           # 32 held-out questions, batch 16
    python benchmarks/bench_eval.py --threads 1 --questions 48 --batch-size 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_common import (
    RESULTS_DIR,
    add_threads_argument,
    apply_threads,
    command_line,
    generated_line,
    load_average,
    machine_info,
    peak_rss_bytes,
    render_machine,
    write_report,
)
from bench_demo_data import add_data_argument, build_feature_cache, copy_subset, prepared_root

MIB = 2**20
SYSTEM_PROMPT = "Answer the question in a few words."  # the demo's
MAX_NEW_TOKENS = 24  # the demo's eval.max_new_tokens
MODES = ("teacher.text", "student.text", "student.speech")
TARGET = 3.0


def eval_overrides(data_root: Path, out_dir: Path, batch_size: int) -> list[str]:
    """The demo's EvalConfig (cmkd.demo `_eval_config`) with the batch size under test."""
    return [
        f"run.out_dir={out_dir}",
        f"data.root={data_root}",
        "student.lm=smollm2",
        "student.encoder=whisper-tiny.en",
        "student.lm_mode=lora",
        "student.lora.r=8",
        "student.projector.kind=posterior",
        "teacher.model=smollm2",
        f"teacher.system_prompt={SYSTEM_PROMPT}",
        "eval.suite=demo",
        f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        f"eval.batch_size={batch_size}",
    ]


@dataclass
class ModeResult:
    seconds: float  # Σ per-item wall seconds recorded by the runner
    items: int
    tokens: int  # answer tokens generated (SmolLM2 tokenizer)
    answers: dict[str, str]  # item id -> answer


@dataclass
class EvalRun:
    batch_size: int
    modes: dict[str, ModeResult] = field(default_factory=dict)
    total_seconds: float = 0.0  # the whole run_eval call, model loading included
    speech_from_cache: int = 0
    peak_rss: int = 0


def child(data_root: Path, out_dir: Path, batch_size: int) -> EvalRun:
    """`run_eval` with generation only; per-mode times from the per-item rows it writes."""
    from transformers import AutoTokenizer

    from cmkd import assets
    from cmkd.config import load_config
    from cmkd.data import speech_inputs
    from cmkd.eval.runner import run_eval
    from cmkd.stage_configs import EvalConfig

    opened: list[speech_inputs.SpeechInputs] = []
    original_open = speech_inputs.SpeechInputs.open.__func__  # type: ignore[attr-defined]

    def recording_open(cls: type, *args: object, **kwargs: object) -> speech_inputs.SpeechInputs:
        opened.append(original_open(cls, *args, **kwargs))
        return opened[-1]

    speech_inputs.SpeechInputs.open = classmethod(recording_open)  # type: ignore[method-assign, assignment]
    cfg = load_config(EvalConfig, None, eval_overrides(data_root, out_dir, batch_size))
    start = time.perf_counter()
    result = run_eval(
        cfg, out_dir, cascade=False, mismatched_audio=False, teacher_forced=False, progress=False
    )
    run = EvalRun(batch_size, total_seconds=time.perf_counter() - start)
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path(fetch=False))
    for mode in MODES:
        rows = [json.loads(line) for line in (result.items_dir / f"{mode}.jsonl").read_text().splitlines()]
        run.modes[mode] = ModeResult(
            seconds=sum(row["seconds"] for row in rows),
            items=len(rows),
            tokens=sum(len(tokenizer.encode(row["response"], add_special_tokens=False)) for row in rows),
            answers={row["id"]: row["response"] for row in rows},
        )
    run.speech_from_cache = sum(inputs.read_from_cache for inputs in opened)
    run.peak_rss = peak_rss_bytes()
    return run


def run_child(data_root: Path, out_dir: Path, batch_size: int) -> EvalRun:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(data_root), str(out_dir), str(batch_size)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"eval at batch {batch_size} failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["modes"] = {mode: ModeResult(**value) for mode, value in data["modes"].items()}
    return EvalRun(**data)


def render(
    runs: dict[int, list[EvalRun]],
    args: argparse.Namespace,
    n_items: int,
    cache: tuple[int, float],
    info: dict[str, str],
    command: str,
) -> str:
    batched, single = runs[args.batch_size], runs[1]

    def rate(entries: list[EvalRun], mode: str) -> float:
        return statistics.median(run.modes[mode].items / run.modes[mode].seconds for run in entries)

    lines = [
        "# Eval: batched generation vs one question at a time",
        "",
        generated_line(command),
        "",
        f"`run_eval` on {n_items} demo held-out questions (spread over the 8 categories; hibari clips), greedy, ≤ "
        f"{MAX_NEW_TOKENS} new tokens, generation only (no teacher-forced passes, cascade or controls); "
        f"eval.batch_size {args.batch_size} (the eval default) vs 1; {args.rounds} interleaved round(s), one fresh "
        "process per run. Student: Whisper tiny.en + posterior connector + SmolLM2 LoRA r = 8 (untrained), speech "
        f"from the posterior feature cache ({cache[0]} clips, built beforehand in {cache[1]:.0f} s, not timed).",
        "",
        "| mode | batch | questions/s (median) | s per question | answer tokens/s | speed-up vs batch 1 | answers "
        "identical to batch 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    speedups = {}
    for mode in MODES:
        base = rate(single, mode)
        for entries, batch in ((single, 1), (batched, args.batch_size)):
            value = rate(entries, mode)
            first = entries[0].modes[mode]
            reference = single[0].modes[mode].answers
            same = sum(first.answers[key] == reference.get(key) for key in first.answers) / max(
                first.items, 1
            )
            tokens_rate = statistics.median(
                run.modes[mode].tokens / run.modes[mode].seconds for run in entries
            )
            lines.append(
                f"| {mode} | {batch} | {value:.3f} | {1 / value:.2f} | {tokens_rate:.1f} | {value / base:.2f}x | "
                f"{same:.0%} |"
            )
        speedups[mode] = rate(batched, mode) / base
    student_modes = [mode for mode in MODES if mode.startswith("student")]
    worst = min(speedups[mode] for mode in student_modes)
    verdict = "met" if worst >= TARGET else f"MISSED ({TARGET / worst:.2f}x short)"
    lines += [
        "",
        f"Target ≥ {TARGET:g}x questions/s on the student's text and speech modes: {verdict} (text "
        f"{speedups['student.text']:.2f}x, speech {speedups['student.speech']:.2f}x; teacher text "
        f"{speedups['teacher.text']:.2f}x).",
        "",
        "Whole `run_eval` call (model loading, all three modes): "
        + "; ".join(
            f"batch {batch}: {', '.join(f'{run.total_seconds:.0f} s' for run in entries)}"
            for batch, entries in runs.items()
        )
        + f". Speech prompts read from the feature cache: {batched[0].speech_from_cache} (batch {args.batch_size}), "
        f"{single[0].speech_from_cache} (batch 1). Peak RSS MiB: "
        + "; ".join(
            f"batch {batch}: {max(run.peak_rss for run in entries) / MIB:,.0f}"
            for batch, entries in runs.items()
        )
        + ".",
        "",
        *render_machine(info, command),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32, help="demo held-out questions (spread)")
    parser.add_argument("--batch-size", type=int, default=16, help="the batched variant's eval.batch_size")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved batched / one-by-one run pairs")
    add_data_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "eval.md")
    parser.add_argument(
        "--child", nargs=3, help=argparse.SUPPRESS
    )  # internal: data root, out dir, batch size
    args = parser.parse_args()
    if args.child:
        data_root, out_dir, batch_size = args.child
        print(json.dumps(asdict(child(Path(data_root), Path(out_dir), int(batch_size)))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_threads(args.threads)
    info = machine_info()
    command = command_line()
    source = prepared_root(args.data)
    runs: dict[int, list[EvalRun]] = {1: [], args.batch_size: []}
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-eval-") as scratch_name:
        scratch = Path(scratch_name)
        data_root = scratch / "data"
        records = copy_subset(
            source, data_root, "heldout.jsonl", args.questions, lambda voice: voice == "hibari"
        )
        from cmkd.config import load_config
        from cmkd.models.build import build_student
        from cmkd.stage_configs import EvalConfig

        cfg = load_config(EvalConfig, None, eval_overrides(data_root, scratch / "unused", args.batch_size))
        cache = build_feature_cache(data_root, build_student(cfg.student), ["heldout.jsonl"])
        print(f"setup: {len(records)} questions, cache {cache[1]:.0f} s; load {load_average()}", flush=True)
        for round_index in range(args.rounds):
            for batch in (args.batch_size, 1):
                run = run_child(data_root, scratch / f"eval-b{batch}-{round_index}", batch)
                runs[batch].append(run)
                print(f"round {round_index + 1}: batch {batch:2d} "
                      + ", ".join(f"{mode} {r.items / r.seconds:.2f} q/s" for mode, r in run.modes.items())
                      + f"  load {load_average()}", flush=True)  # fmt: skip
    write_report(args.out, render(runs, args, len(records), cache, info, command))


if __name__ == "__main__":
    main()
