"""Teacher generation: batched (left-padded, one `generate` per batch) vs one question at a time.

The prepare stage writes ŷ for every question; a probe generated them one by one at ~20 tokens/s. This runs both
variants on the same demo questions in one process, interleaved, with the embedded SmolLM2, greedy, with the top-k
logit capture the prepare stage uses, and writes benchmarks/results/teacher_generation.md.

    python benchmarks/bench_teacher_generation.py [--questions 32] [--batch-size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import transformers

from cmkd.data.demo_questions import load_demo_questions
from cmkd.data.teacher_targets import TeacherRequest, generate_batch
from cmkd.models.loading import load_causal_lm

SYSTEM = "Answer the question in a few words."


def run(requests: list[TeacherRequest], model, tokenizer, batch_size: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    tokens = 0
    for first in range(0, len(requests), batch_size):
        targets = generate_batch(
            model,
            tokenizer,
            requests[first : first + batch_size],
            max_new_tokens=24,
            top_k=64,
            temperature=2.0,
        )
        tokens += sum(len(t.response_ids) + 1 for t in targets)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/teacher_generation.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tokenizer = load_causal_lm("smollm2")
    questions = load_demo_questions()[:: max(1, 460 // args.questions)][: args.questions]
    requests = [TeacherRequest(q.id, q.question, SYSTEM) for q in questions]
    run(requests[:2], model, tokenizer, 2)  # warm-up
    one_s, one_tokens = run(requests, model, tokenizer, 1)
    batch_s, batch_tokens = run(requests, model, tokenizer, args.batch_size)
    load_after = os.getloadavg()
    one_rate, batch_rate = one_tokens / one_s, batch_tokens / batch_s
    rows = [
        ("one at a time", 1, one_s, one_tokens, one_rate, 1.0),
        (
            f"batched ({args.batch_size})",
            args.batch_size,
            batch_s,
            batch_tokens,
            batch_rate,
            batch_rate / one_rate,
        ),
    ]
    lines = [
        "# Teacher generation: batched vs one question at a time",
        "",
        f"`python benchmarks/bench_teacher_generation.py --questions {args.questions} --batch-size {args.batch_size} "
        f"--threads {args.threads}`; SmolLM2-135M-Instruct (embedded), greedy, ≤ 24 new tokens, top-64 capture at τ = 2, "
        f'{len(requests)} demo questions, system prompt "{SYSTEM}". Target (issue): batched ≥ 3× tokens/s.',
        "",
        "| variant | batch | seconds | tokens (ŷ + end of turn) | tokens/s | speed-up |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {b} | {s:.1f} | {t} | {r:.1f} | {x:.2f}× |" for name, b, s, t, r, x in rows],
        "",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} torch thread(s); "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
