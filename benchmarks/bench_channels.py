"""Channels: one teacher pass shared by T→T and S→T (the loop's design) vs one teacher pass per channel.

Claim checked (design §1): both channels distil toward the same p_T(·|Q_t, ŷ<i), so one teacher pass per example
serves both; running it per channel doubles the teacher's work for nothing. This measures what that saves in a
real step: the embedded default (SmolLM2-135M-Instruct teacher; student = Whisper tiny.en encoder + projector +
SmolLM2 with LoRA), both channels on, online teacher, hibari speech for the S→T prompts.

Both variants run `run_training` itself, each in a fresh process, interleaved over rounds. The loop's
teacher-rows provider is wrapped (`bench_common.TimedTeacherRows`, installed through
`cmkd.train.loop.build_teacher_rows` in the child process, the loop's one seam for it) to time every call and
count the response tokens it serves; the per-channel variant's wrapper calls the provider once per channel and
hands the loop the last result, which is what a loop that fetched teacher rows inside its channel loop would
compute. The provider's own counter (`TrainResult.teacher_examples`) counts the examples the teacher ran on. Step time = response tokens x channels / the loop's tokens/s;
the teacher's share = provider seconds / step seconds. Medians over every step but each run's first. Both
variants see the same batches in the same order (same seed), so step i of round r of one is paired with step i of
round r of the other; the median of those paired ratios is less exposed to slow and fast batches than a ratio of
medians.

    python benchmarks/bench_channels.py                       # 16 questions, batch 4, 3 rounds of 5 steps
    python benchmarks/bench_channels.py --rounds 5 --steps 8 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    RESULTS_DIR,
    TimedRun,
    add_threads_argument,
    apply_threads,
    command_line,
    generated_line,
    load_average,
    machine_info,
    print_run,
    render_machine,
    run_timed_training,
    run_training_child,
    spread_questions,
    write_report,
)

from cmkd.data.records import PairedRecord, SpeechClip, write_manifest
from cmkd.data.teacher_targets import TeacherRequest, generate_targets
from cmkd.data.tts import TTSJob, synthesize_many
from cmkd.models.loading import load_causal_lm
from cmkd.stage_configs import TeacherSettings

MODEL = "smollm2"
SYSTEM_PROMPT = TeacherSettings().system_prompt
CHANNELS = ("t2t", "s2t")
PASSES_PER_CALL = {"shared": 1, "per-channel": len(CHANNELS)}
LABELS = {
    "shared": "one teacher pass per micro-batch, shared by T→T and S→T (the loop)",
    "per-channel": "one teacher pass per channel per micro-batch",
}


def prepare_data(data_root: Path, n_questions: int, max_new_tokens: int) -> float:
    """Manifest of teacher answers with one hibari clip per question; returns the mean clip length in seconds."""
    model, tokenizer = load_causal_lm(MODEL)
    questions = spread_questions(n_questions)
    requests = [TeacherRequest(q.id, q.question, SYSTEM_PROMPT) for q in questions]
    targets = {
        target.item_id: target
        for batch in generate_targets(
            model, tokenizer, requests, batch_size=16, max_new_tokens=max_new_tokens
        )
        for target in batch
    }
    jobs = [TTSJob(q.id, q.question, "hibari", "", data_root / "audio" / f"{q.id}.flac") for q in questions]
    results = synthesize_many(jobs, workers=1, progress=False)
    failed = [r for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"hibari failed on {len(failed)} question(s), first: {failed[0].error}")
    records = [
        PairedRecord(
            id=q.id,
            prompt=q.question,
            speech=[SpeechClip(audio=f"audio/{q.id}.flac", sr=16000, source="hibari")],
            target=q.answer,
            teacher_response=targets[q.id].response,
            teacher_response_ids=targets[q.id].response_ids,
            teacher_truncated=targets[q.id].truncated,
        )
        for q in questions
    ]
    write_manifest(data_root / "train.jsonl", records)
    return statistics.mean(r.seconds for r in results)


def child_train(variant: str, data_root: Path, out_dir: Path, steps: int, batch_size: int) -> None:
    overrides = [
        f"run.out_dir={out_dir}",
        f"data.root={data_root}",
        f"student.lm={MODEL}",
        "student.lm_mode=lora",
        f"teacher.model={MODEL}",
        "train.teacher_source=online",
        "train.text_to_text=true",
        "train.speech_to_text=true",
        f"train.steps={steps}",
        f"train.batch_size={batch_size}",
        "train.warmup_steps=0",
        "train.log_every=1",
        f"train.save_every={steps}",
    ]
    print_run(run_timed_training(overrides, PASSES_PER_CALL[variant]))


@dataclass
class StepTimes:
    """Steps after each run's first, pooled over rounds."""

    step_seconds: list[float] = field(default_factory=list)
    teacher_seconds: list[float] = field(default_factory=list)
    teacher_examples: list[int] = field(default_factory=list)  # per run
    teacher_calls: list[int] = field(default_factory=list)  # per run

    def add(self, run: TimedRun) -> None:
        self.step_seconds += run.step_seconds(len(CHANNELS))[1:]  # the first step pays one-off warm-up costs
        self.teacher_seconds += run.teacher_seconds[1:]
        self.teacher_examples.append(run.teacher_examples)
        self.teacher_calls.append(run.teacher_calls)


def render(
    times: dict[str, StepTimes],
    args: argparse.Namespace,
    clip_seconds: float,
    info: dict[str, str],
    command: str,
) -> str:
    lines = [
        "# Channels: one shared teacher pass vs one per channel",
        "",
        generated_line(command),
        "",
        "Embedded default, T→T + S→T, LoRA student (Whisper tiny.en + projector + SmolLM2), online SmolLM2",
        f"teacher; {args.questions} demo questions with the teacher's own answers and hibari speech (mean clip",
        f"{clip_seconds:.1f} s); batch {args.batch_size}, {args.steps} steps per run, {args.rounds} interleaved",
        "round(s), one fresh process per run; medians over every step but each run's first.",
        "",
        "| variant | teacher calls per run | teacher examples per run (counter) | examples per step x steps | step s "
        "(median) | teacher s per step (median) | rest of step s (median) | teacher share of step | step time vs "
        "shared (paired median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, entry in times.items():
        step = statistics.median(entry.step_seconds)
        teacher = statistics.median(entry.teacher_seconds)
        rest = statistics.median(
            s - t for s, t in zip(entry.step_seconds, entry.teacher_seconds, strict=True)
        )
        share = statistics.median(
            t / s for t, s in zip(entry.teacher_seconds, entry.step_seconds, strict=True)
        )
        paired = statistics.median(
            s / base for s, base in zip(entry.step_seconds, times["shared"].step_seconds, strict=True)
        )
        lines.append(
            f"| {variant}: {LABELS[variant]} | {', '.join(map(str, entry.teacher_calls))} | "
            f"{', '.join(map(str, entry.teacher_examples))} | {args.batch_size} x {args.steps} | {step:.2f} | "
            f"{teacher:.2f} | {rest:.2f} | {share:.1%} | {paired:.2f}x |"
        )
    lines += [
        "",
        "Per-step values (s): "
        + "; ".join(
            f"{variant} steps {', '.join(f'{s:.2f}' for s in entry.step_seconds)}, teacher "
            f"{', '.join(f'{t:.2f}' for t in entry.teacher_seconds)}"
            for variant, entry in times.items()
        ),
        "",
        *render_machine(info, command),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--questions", type=int, default=16, help="demo questions (each gets one hibari clip)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="longest teacher answer (the demo's)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved shared/per-channel run pairs")
    add_threads_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "channels.md")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # internal: one training run
    args = parser.parse_args()
    if args.child:
        variant, data_root, out_dir, steps, batch_size = args.child
        child_train(variant, Path(data_root), Path(out_dir), int(steps), int(batch_size))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_threads(args.threads)
    info = machine_info()
    command = command_line()
    times = {variant: StepTimes() for variant in PASSES_PER_CALL}
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-channels-") as scratch_name:
        scratch = Path(scratch_name)
        data_root = scratch / "data"
        start = time.perf_counter()
        clip_seconds = prepare_data(data_root, args.questions, args.max_new_tokens)
        print(f"setup done in {time.perf_counter() - start:.0f} s; load {load_average()}", flush=True)
        for round_index in range(args.rounds):
            for variant, entry in times.items():
                out_dir = scratch / f"run-{variant}-{round_index}"
                child_args = [variant, str(data_root), str(out_dir), str(args.steps), str(args.batch_size)]
                run = run_training_child(__file__, child_args, f"the {variant} run")
                entry.add(run)
                print(f"round {round_index + 1}: {variant:11s} tokens/s {', '.join(f'{v:.0f}' for v in run.tokens_per_s)}"
                      f"  teacher s {', '.join(f'{t:.2f}' for t in run.teacher_seconds)}  load {load_average()}",
                      flush=True)  # fmt: skip
    write_report(args.out, render(times, args, clip_seconds, info, command))


if __name__ == "__main__":
    main()
