"""Teacher cost: a T→T LoRA step with the cached top-k teacher vs the online teacher, and what the cache loses.

Claims checked (issue targets), on the embedded default (SmolLM2-135M-Instruct, real weights, as teacher and as
the student's backbone with LoRA):
  1. training with the cached top-k teacher runs ≥ 1.4x the response tokens/s of running the teacher online;
  2. the sparse top-k KL (k kept tokens + one tail bucket) is within 2% of the full-vocabulary KL at k = 64;
  3. the cache costs ≤ 300 bytes per response token.

Setup (not timed): the teacher answers ~50 demo questions with `generate_targets` exactly as `cmkd prepare` does
(greedy ŷ, top-k log-probs at τ taken from the generation logits), and caches of k = 16..4096 are written with
`LogitCacheWriter` (k beyond 64 shows how far the cache is from the dense KL, not a suggested setting). For
reference, τ = 1 caches are made from the dense rows too: at τ = 2 the teacher's tail is far heavier, and a cache
is tied to its τ. The KL error compares, on the same response rows, the dense KL against the online teacher's
rows (`OnlineTeacherRows`: a teacher-forced pass over Q_t + ŷ) with the sparse KL against the cache as training
reads it back (`CachedTeacherRows`: fp16 log-probs, uint16 ids). So the error includes the top-k cut, fp16
storage, and generation-vs-teacher-forcing rounding: everything that separates the two training paths.

A KL error needs a student that differs from the teacher (the LoRA student at step 0 IS the teacher: KL = 0).
Two students bracket the range, both SmolLM2 scoring the same ŷ after a different prompt:
  - `mild`: the question without the brevity system prompt (a student whose context drifted a little);
  - `far`: another question's text (a student that did not understand the question: an untrained S→T projector,
    which learns the question type before its content; design §3).

Throughput: `run_training` itself (T→T only, LoRA, batch 8) in a fresh process per run, online and cached runs
interleaved over rounds; tokens/s is the loop's own per-step metric (response tokens / step wall time, optimizer
step included), median over the steps after the first. The teacher side is timed inside the same steps
(`bench_common.TimedTeacherRows`), so the online teacher's share of a step is measured, not inferred.

    python benchmarks/bench_teacher_cost.py                      # 48 questions, 3 rounds of 6 steps
    python benchmarks/bench_teacher_cost.py --rounds 0           # cache error and size only (about a minute)
    python benchmarks/bench_teacher_cost.py --questions 96 --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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

from cmkd.data.logit_cache import CacheMeta, LogitCacheReader, LogitCacheWriter, tokenizer_hash
from cmkd.data.records import PairedRecord, read_manifest, write_manifest
from cmkd.data.teacher_targets import TeacherRequest, generate_targets
from cmkd.losses import TopKTeacher, check_aligned, gather_response_rows, kd_loss, teacher_topk
from cmkd.models.loading import load_causal_lm
from cmkd.models.speech_lm import Prompt
from cmkd.models.teacher import TextTeacher
from cmkd.stage_configs import CETarget, TeacherSettings
from cmkd.train.examples import TrainExample, build_examples
from cmkd.train.setup import LOGIT_CACHE_DIR
from cmkd.train.teacher_rows import CachedTeacherRows, OnlineTeacherRows

TEMPERATURE = 2.0  # τ: the cache is made at the loss temperature
TRAIN_K = 64  # the demo's cache size, used by the cached training run
TEACHER = "smollm2"
SYSTEM_PROMPT = TeacherSettings().system_prompt  # the prepare/train default the cache is made with
TARGETS = {"speed-up": 1.4, "kl error at k=64": 0.02, "bytes/token at k=64": 300}


# ---------------------------------------------------------------------------------------------------------------
# Setup: the teacher's answers and caches, as `cmkd prepare` makes them
# ---------------------------------------------------------------------------------------------------------------


def write_cache(
    directory: Path, meta: CacheMeta, item_ids: list[str], rows: list[tuple[torch.Tensor, torch.Tensor]]
) -> Path:
    """One cache directory through the real writer (uint16 ids, fp16 log-probs), keeping the first k columns."""
    LogitCacheWriter(directory, meta).write(
        item_ids, [(ids[:, : meta.k], lp[:, : meta.k]) for ids, lp in rows]
    )
    return directory


def prepare_data(
    teacher: TextTeacher, data_root: Path, n_questions: int, ks: list[int], max_new_tokens: int
) -> dict[int, Path]:
    """Manifest of teacher answers in data_root, and one τ-cache per k (k = TRAIN_K where training reads it)."""
    questions = spread_questions(n_questions)
    requests = [TeacherRequest(q.id, q.question, SYSTEM_PROMPT) for q in questions]
    targets = [
        target
        for batch in generate_targets(
            teacher.model,
            teacher.tokenizer,
            requests,
            batch_size=16,
            max_new_tokens=max_new_tokens,
            top_k=max(ks),
            temperature=TEMPERATURE,
        )
        for target in batch
    ]
    by_id = {q.id: q for q in questions}
    records = [
        PairedRecord(
            id=t.item_id,
            prompt=by_id[t.item_id].question,
            target=by_id[t.item_id].answer,
            teacher_response=t.response,
            teacher_response_ids=t.response_ids,
            teacher_truncated=t.truncated,
        )
        for t in targets
    ]
    write_manifest(data_root / "train.jsonl", records)
    item_ids = [t.item_id for t in targets]
    rows = [(t.topk.ids, t.topk.logprobs) for t in targets if t.topk is not None]  # n_i + 1, max(ks) each
    token_hash = tokenizer_hash(teacher.tokenizer)
    # Rows are sorted by descending probability, so the first k columns of the largest top-k ARE the top-k.
    return {
        k: write_cache(
            data_root / (LOGIT_CACHE_DIR if k == TRAIN_K else f"cache-k{k}"),
            CacheMeta(TEACHER, token_hash, teacher.vocab_size, k, TEMPERATURE),
            item_ids,
            rows,
        )
        for k in ks
    }


# ---------------------------------------------------------------------------------------------------------------
# KL error of the cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class KLError:
    temperature: float
    student: str
    k: int
    dense_kl: float  # Σ over response rows of τ²·KL, full vocabulary
    sparse_kl: float  # the same from the cache
    grad_error: float  # ‖g_sparse − g_dense‖ / ‖g_dense‖ of the KD gradients w.r.t. the student logits
    grad_cosine: float
    tail_mass: float  # mean teacher probability at τ outside the kept k

    @property
    def relative_error(self) -> float:
        return (self.dense_kl - self.sparse_kl) / self.dense_kl


def student_rows(
    teacher: TextTeacher, prompts: list[Prompt], examples: list[TrainExample], teacher_mask: torch.Tensor
) -> torch.Tensor:
    """Logits [N, V] of SmolLM2 scoring each example's ŷ after `prompts` (rows aligned with the teacher's)."""
    output = teacher.forward(prompts, [list(e.response_ids) for e in examples])
    check_aligned(output.prediction_mask, teacher_mask, [e.item_id for e in examples])
    return gather_response_rows(output.logits, output.prediction_mask)  # B, T, V -> N, V


def _kd_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | TopKTeacher, temperature: float
) -> tuple[float, torch.Tensor]:
    logits = logits.detach().requires_grad_(True)  # N, V
    kd = kd_loss(logits, targets, teacher, temperature=temperature, kd_weight=1.0).kd
    (grad,) = torch.autograd.grad(kd, logits)  # N, V
    return kd.item(), grad


def measure_kl_error(
    teacher: TextTeacher, data_root: Path, cache_dirs: dict[int, Path], scratch: Path
) -> tuple[list[KLError], int]:
    """KL errors at the cache's τ (the training path) and, for reference, at τ = 1 (caches from the dense rows)."""
    examples = build_examples(
        read_manifest(data_root / "train.jsonl"),
        root=data_root,
        tokenizer=teacher.tokenizer,
        ce_target=CETarget.TEACHER,
        system_prompt=SYSTEM_PROMPT,
        need_speech=False,
    )
    item_ids = [e.item_id for e in examples]
    dense_teacher, teacher_mask = OnlineTeacherRows(teacher, teacher.vocab_size)(
        examples
    )  # N, V: online path
    assert isinstance(dense_teacher, torch.Tensor)
    # CE targets: ŷ and the end of turn. Only the KD term is compared; kd_loss needs targets to count rows.
    end_of_turn = teacher.chat.end_of_turn_id
    targets = torch.cat([torch.tensor([*e.response_ids, end_of_turn]) for e in examples])  # N
    students = {
        "mild": [Prompt(system=None, text=e.text) for e in examples],
        "far": [Prompt(system=e.system, text=examples[(i + 1) % len(examples)].text) for i, e in enumerate(examples)],
    }  # fmt: skip
    with torch.no_grad():
        logits_of = {
            name: student_rows(teacher, prompts, examples, teacher_mask) for name, prompts in students.items()
        }
    # τ = 1 reference caches: top-k of the dense rows, split back per example, through the same writer.
    lengths = [len(e.response_ids) + 1 for e in examples]
    reference = teacher_topk(dense_teacher, max(cache_dirs), 1.0)
    reference_rows = list(zip(reference.ids.split(lengths), reference.logprobs.split(lengths), strict=True))
    caches = {(TEMPERATURE, k): directory for k, directory in cache_dirs.items()}
    token_hash = tokenizer_hash(teacher.tokenizer)
    for k in cache_dirs:
        meta = CacheMeta(TEACHER, token_hash, teacher.vocab_size, k, 1.0)
        caches[(1.0, k)] = write_cache(scratch / f"reference-t1-k{k}", meta, item_ids, reference_rows)

    dense = {
        (temperature, name): _kd_and_grad(logits, targets, dense_teacher, temperature)
        for temperature in (TEMPERATURE, 1.0)
        for name, logits in logits_of.items()
    }  # (τ, student) -> (Σ τ²·KL, gradient N, V)
    results = []
    for (temperature, k), directory in sorted(caches.items(), key=lambda item: (-item[0][0], item[0][1])):
        cached = CachedTeacherRows(LogitCacheReader(directory))(examples)[0]  # the training read path
        assert isinstance(cached, TopKTeacher)
        dense_logp = torch.log_softmax(dense_teacher.float() / temperature, dim=-1)  # N, V
        tail_mass = (1.0 - dense_logp.gather(-1, cached.ids).exp().sum(dim=-1)).mean().item()  # N, k -> []
        for name, logits in logits_of.items():
            dense_kl, dense_grad = dense[(temperature, name)]
            sparse_kl, sparse_grad = _kd_and_grad(logits, targets, cached, temperature)
            dense_grad, sparse_grad = (
                dense_grad.double(),
                sparse_grad.double(),
            )  # N, V: norms over ~10^7 terms
            results.append(
                KLError(
                    temperature=temperature,
                    student=name,
                    k=k,
                    dense_kl=dense_kl,
                    sparse_kl=sparse_kl,
                    grad_error=((sparse_grad - dense_grad).norm() / dense_grad.norm()).item(),
                    grad_cosine=F.cosine_similarity(
                        dense_grad.flatten(), sparse_grad.flatten(), dim=0
                    ).item(),
                    tail_mass=tail_mass,
                )
            )
    return results, int(dense_teacher.shape[0])


def cache_bytes(directory: Path, n_rows: int) -> tuple[int, float]:
    """(CacheMeta's bytes/token, bytes/token on disk including shard headers, offsets and the id index)."""
    meta = LogitCacheReader(directory).meta
    on_disk = sum(path.stat().st_size for path in directory.iterdir() if path.name != "meta.json")
    return meta.bytes_per_token(), on_disk / n_rows


# ---------------------------------------------------------------------------------------------------------------
# Throughput: the real loop, one fresh process per run
# ---------------------------------------------------------------------------------------------------------------


def child_train(source: str, data_root: Path, out_dir: Path, steps: int, batch_size: int) -> None:
    """One `run_training` with the teacher online or cached; prints its TimedRun for the parent."""
    overrides = [
        f"run.out_dir={out_dir}",
        f"data.root={data_root}",
        f"student.lm={TEACHER}",
        "student.lm_mode=lora",
        f"teacher.model={TEACHER}",
        f"teacher.logits_top_k={TRAIN_K}",
        f"loss.temperature={TEMPERATURE}",
        f"train.teacher_source={source}",
        "train.speech_to_text=false",
        f"train.steps={steps}",
        f"train.batch_size={batch_size}",
        "train.warmup_steps=0",
        "train.log_every=1",
        f"train.save_every={steps}",
    ]
    print_run(run_timed_training(overrides, passes_per_call=1))


@dataclass
class Throughput:
    """Steps after each run's first, pooled over rounds in run order (so the two sources pair step by step)."""

    source: str
    tokens_per_s: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    teacher_seconds: list[float] = field(default_factory=list)  # the teacher pass, or the cache read
    teacher_examples: list[int] = field(default_factory=list)  # per run
    peak_rss: list[int] = field(default_factory=list)  # per run

    def add(self, run: TimedRun) -> None:
        self.tokens_per_s += run.tokens_per_s[1:]  # the first step pays one-off warm-up costs
        self.step_seconds += run.step_seconds(channels=1)[1:]
        self.teacher_seconds += run.teacher_seconds[1:]
        self.teacher_examples.append(run.teacher_examples)
        self.peak_rss.append(run.peak_rss)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def render_throughput(throughput: dict[str, Throughput], args: argparse.Namespace) -> list[str]:
    online, cached = throughput["online"], throughput["cache"]
    speedup = statistics.median(
        base / step for base, step in zip(online.step_seconds, cached.step_seconds, strict=True)
    )
    lines = [
        "## Training throughput (T→T, LoRA, the real loop)",
        "",
        f"`run_training`, batch {args.batch_size}, {args.steps} steps per run, {args.rounds} interleaved round(s),",
        "one fresh process per run; tokens/s = the loop's own metric (response tokens / step time, teacher pass and",
        "optimizer step included); medians over every step but each run's first. Both sources see the same batches",
        "in the same order, so the speed-up is the median of step-by-step ratios. Teacher s = the teacher pass (online)",
        "or the cache read (cached) per step, timed around the loop's teacher-rows provider.",
        "",
        "| teacher | tokens/s (median) | tokens/s (all steps) | speed-up (paired median) | teacher s per step "
        "(median) | teacher share of step | teacher examples per run | process peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in (online, cached):
        values = ", ".join(f"{v:.1f}" for v in entry.tokens_per_s)
        ratio = statistics.median(
            base / step for base, step in zip(online.step_seconds, entry.step_seconds, strict=True)
        )
        share = statistics.median(
            t / s for t, s in zip(entry.teacher_seconds, entry.step_seconds, strict=True)
        )
        label = (
            "online (teacher pass per micro-batch)" if entry.source == "online" else f"cached top-{TRAIN_K}"
        )
        lines.append(
            f"| {label} | {statistics.median(entry.tokens_per_s):.1f} | {values} | {ratio:.2f}x | "
            f"{statistics.median(entry.teacher_seconds):.3f} | {share:.1%} | "
            f"{', '.join(map(str, entry.teacher_examples))} | {max(entry.peak_rss) / 2**20:,.0f} |"
        )
    online_share = statistics.median(
        t / s for t, s in zip(online.teacher_seconds, online.step_seconds, strict=True)
    )
    lines += [
        "",
        f"Target ≥ {TARGETS['speed-up']}x: {'met' if speedup >= TARGETS['speed-up'] else 'MISSED'} ({speedup:.2f}x). "
        f"Removing the online teacher's {online_share:.0%} of a step alone would give {1 / (1 - online_share):.2f}x.",
        "",
    ]
    return lines


def render(
    throughput: dict[str, Throughput],
    kl_errors: list[KLError],
    sizes: dict[int, tuple[int, float]],
    n_rows: int,
    args: argparse.Namespace,
    info: dict[str, str],
    command: str,
    setup_seconds: float,
) -> str:
    lines = [
        "# Teacher cost: cached top-k teacher vs online teacher",
        "",
        generated_line(command),
        "",
        f"Embedded default SmolLM2-135M-Instruct as teacher and student backbone; {args.questions} demo questions,",
        f"teacher answers generated greedily (≤ {args.max_new_tokens} tokens), {n_rows} response rows (tokens + end",
        f"of turn); τ = {TEMPERATURE}. Setup (generation, caches, KL error) took {setup_seconds:.0f} s.",
        "",
    ]
    if args.rounds > 0:
        lines += render_throughput(throughput, args)
    lines += [
        "## KL error of the top-k cache",
        "",
        "Σ over all response rows of τ²·KL(p_T ‖ p_S): dense (the online teacher's rows, full vocabulary) vs sparse",
        "(the cache as training reads it: k tokens + one tail bucket, fp16 log-probs, uint16 ids). Relative error =",
        "(dense − sparse) / dense; the sparse KL is a lower bound (the bucket cannot see how the teacher's and the",
        "student's tails differ inside it). Gradient error = ‖g_sparse − g_dense‖ / ‖g_dense‖ of the KD gradients",
        "w.r.t. the student logits (what training feels). Tail mass = mean teacher probability at τ outside the",
        f"kept k. τ = {TEMPERATURE} is the training setting (caches from the generation logits, as prepare makes them);",
        "τ = 1 is a reference only (caches from the dense rows): a cache is tied to its τ.",
        "",
        "| τ | student | k | teacher tail mass | dense τ²·KL sum | sparse τ²·KL sum | relative error | KD gradient "
        "error | gradient cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for error in kl_errors:
        lines.append(
            f"| {error.temperature:g} | {error.student} | {error.k} | {error.tail_mass:.3f} | {error.dense_kl:.2f} "
            f"| {error.sparse_kl:.2f} | {error.relative_error:.2%} | {error.grad_error:.2%} | "
            f"{error.grad_cosine:.4f} |"
        )
    at_train_k = [e for e in kl_errors if e.k == TRAIN_K and e.temperature == TEMPERATURE]
    worst = max((e.relative_error for e in at_train_k), default=float("nan"))
    verdict = "met" if worst <= TARGETS["kl error at k=64"] else "MISSED"
    lines += [
        "",
        f"Target ≤ {TARGETS['kl error at k=64']:.0%} at k = {TRAIN_K}, τ = {TEMPERATURE}: {verdict} (worst student "
        f"{worst:.2%}).",
        "",
        "## Cache size",
        "",
        "| k | bytes/token (CacheMeta) | bytes/token on disk (with headers, offsets, index) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {meta} | {disk:.1f} |" for k, (meta, disk) in sorted(sizes.items())]
    meta_at_k = sizes[TRAIN_K][0] if TRAIN_K in sizes else float("nan")
    lines += [
        "",
        f"Target ≤ {TARGETS['bytes/token at k=64']} bytes/token at k = {TRAIN_K}: "
        f"{'met' if meta_at_k <= TARGETS['bytes/token at k=64'] else 'MISSED'} ({meta_at_k} bytes).",
        "",
        *render_machine(info, command),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48, help="demo questions the teacher answers")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="longest teacher answer (the demo's)")
    parser.add_argument(
        "--ks", default="16,32,64,128,1024,4096", help=f"cache sizes to measure; must include {TRAIN_K}"
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved online/cached run pairs (0: cache error and size only)",
    )
    add_threads_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "teacher_cost.md")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # internal: one training run
    args = parser.parse_args()
    if args.child:
        source, data_root, out_dir, steps, batch_size = args.child
        child_train(source, Path(data_root), Path(out_dir), int(steps), int(batch_size))
        return
    ks = sorted({int(k) for k in args.ks.split(",")})
    if TRAIN_K not in ks:
        parser.error(f"--ks must include {TRAIN_K}, the cache the training run reads")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_threads(args.threads)
    info = machine_info()
    command = command_line()
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-teacher-") as scratch_name:
        scratch = Path(scratch_name)
        data_root = scratch / "data"
        start = time.perf_counter()
        model, tokenizer = load_causal_lm(TEACHER)
        teacher = TextTeacher(model, tokenizer)
        cache_dirs = prepare_data(teacher, data_root, args.questions, ks, args.max_new_tokens)
        kl_errors, n_rows = measure_kl_error(teacher, data_root, cache_dirs, scratch)
        del teacher, model  # the training children load their own
        sizes = {k: cache_bytes(directory, n_rows) for k, directory in cache_dirs.items()}
        setup_seconds = time.perf_counter() - start
        print(
            f"setup done in {setup_seconds:.0f} s ({n_rows} response rows); load {load_average()}", flush=True
        )
        throughput = {source: Throughput(source) for source in ("online", "cache")}
        for round_index in range(args.rounds):
            for source, entry in throughput.items():
                out_dir = scratch / f"run-{source}-{round_index}"
                child_args = [source, str(data_root), str(out_dir), str(args.steps), str(args.batch_size)]
                run = run_training_child(__file__, child_args, f"training with the {source} teacher")
                entry.add(run)
                print(f"round {round_index + 1}: {source:6s} tokens/s {', '.join(f'{v:.0f}' for v in run.tokens_per_s)}  "
                      f"load {load_average()}", flush=True)  # fmt: skip
    report = render(throughput, kl_errors, sizes, n_rows, args, info, command, setup_seconds)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
