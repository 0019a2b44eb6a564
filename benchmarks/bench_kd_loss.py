"""KD loss memory and time: cmkd's chunked CE + λτ²KL on response rows vs the naive full-sequence loss.

Claim checked (issue targets): `cmkd.losses.chunked_kd_loss`, fed the response rows the loop gathers, needs at most
0.25x the peak memory of the naive implementation and no more time, forward + backward, and gives the same loss.

The naive loss is what most KD code does: project the LM head on ALL positions of student and teacher, take the
float32 log-softmax of both over [batch, seq, vocab], and mask the non-response positions out afterwards. cmkd
gathers the response rows first (prompt and padding positions never reach the head), projects the teacher's rows
once without grad (as `OnlineTeacherRows` does), and runs `chunked_kd_loss`, which projects the student's rows
chunk by chunk under activation checkpointing. Both start from the same final hidden states and heads, so the
teacher's projection is inside both timings; the student hidden state stands in for the decoder output (the leaf
the gradient is taken for; its gradients are compared too).

Each measurement is a fresh process, so its peak RSS (VmHWM; see `bench_common.peak_rss_bytes`) is that
variant's own; a baseline process that only allocates the inputs is subtracted. Inputs are made in blocks, so
their creation leaves no transient peak that would hide a small loss, and children run with a fixed glibc mmap
threshold (see FIXED_MALLOC_ENV) so RSS follows the tensors a variant holds rather than glibc's heap reuse
(`--glibc-default-malloc` measures without it). Variants are interleaved over rounds so a burst of load from
another process hits all of them alike; the time is the median round.

    python benchmarks/bench_kd_loss.py                          # SmolLM2 and 7B shapes, 3 rounds
    python benchmarks/bench_kd_loss.py --shapes smollm2 --rounds 5 --variants naive,cmkd,cmkd-topk
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

import torch
import torch.nn.functional as F
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

from cmkd.losses import IGNORE_INDEX, TopKTeacher, chunked_kd_loss, gather_response_rows, teacher_topk

TEMPERATURE = 2.0  # τ of the paper
KD_WEIGHT = 0.5  # λ of the paper
TOP_K = 64  # the demo's cache size
MIB = 2**20


@dataclass(frozen=True)
class LossShape:
    """One benchmarked configuration: model width, vocabulary and batch layout."""

    name: str
    hidden: int
    vocab: int
    batch: int
    seq: int  # padded sequence length (prompt + response + padding)
    response: int  # response positions per example (the loss rows)
    dtype: str  # of hidden states and heads; both variants upcast the logits to float32
    note: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]


SHAPES = {
    "smollm2": LossShape("smollm2", 576, 49_152, 8, 256, 64, "float32", "SmolLM2-135M head, fp32 as on the demo CPU"),
    "smollm2-qwen-vocab": LossShape(
        "smollm2-qwen-vocab", 576, 151_936, 4, 256, 64, "float32", "SmolLM2 width with Qwen2.5's vocabulary"
    ),
    "qwen2.5-7b": LossShape(
        "qwen2.5-7b", 3584, 151_936, 2, 256, 64, "bfloat16", "Qwen2.5-7B / Omni-7B thinker head, bf16 weights"
    ),
}  # fmt: skip
VARIANTS = {
    "naive": "naive: fp32 log-softmax of student and teacher over [B, T, V], then masked",
    "cmkd": "cmkd: response rows, chunked_kd_loss (chunk_size 64, the config default)",
    "cmkd-chunk1024": "cmkd: response rows, chunked_kd_loss (chunk_size 1024, the default before 2026-11-22)",
    "cmkd-topk": f"cmkd: response rows, cached top-{TOP_K} teacher (sparse KL), chunk_size 64",
}
CHUNK_SIZE = {"cmkd": 64, "cmkd-chunk1024": 1024, "cmkd-topk": 64}
DEFAULT_SHAPES = ("smollm2", "qwen2.5-7b")
DEFAULT_VARIANTS = ("naive", "cmkd", "cmkd-chunk1024")
# Every allocation of 1 MiB or more gets its own mapping, returned to the OS when freed, so RSS follows the live
# tensors. glibc's default raises that threshold up to 32 MiB after the first large free, and freed [chunk, V]
# tensors below it then stay in the heap: RSS would charge the chunked loss for memory it no longer holds.
FIXED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MIB)}


@dataclass
class Inputs:
    student_hidden: torch.Tensor  # B, T, H (the leaf the gradient is taken for)
    teacher_hidden: torch.Tensor  # B, T, H
    student_head: torch.Tensor  # V, H (frozen: LoRA / projector training; see --trainable-head)
    teacher_head: torch.Tensor  # V, H
    labels: torch.Tensor  # B, T next-token ids at prediction positions, IGNORE_INDEX elsewhere
    prediction_mask: torch.Tensor  # B, T bool: positions whose logits predict a response token


def _gaussian_head(
    shape: tuple[int, int], dtype: torch.dtype, std: float, generator: torch.Generator
) -> torch.Tensor:
    """A [V, H] head of Gaussian rows, made from one random block and its column rotations.

    Drawing V·H fresh normals costs ~25 ns each on the reference machine (45 s for a 7B-size head, per process);
    a row rotated by b columns is a different direction with the same distribution, so the logits of a random
    hidden state are still nearly independent across the vocabulary. Written block by block, so no full-size
    float32 temporary raises the baseline's peak RSS and hides a small loss.
    """
    rows, cols = shape
    block = torch.randn(min(rows, 4096), cols, generator=generator) * std  # R, H
    out = torch.empty(shape, dtype=dtype)  # V, H
    for index, start in enumerate(range(0, rows, block.shape[0])):
        part = out[start : start + block.shape[0]]
        part.copy_(block[: part.shape[0]].roll(shifts=index, dims=1))
    return out


def build_inputs(shape: LossShape, trainable_head: bool, seed: int = 0) -> Inputs:
    """Same tensors in every process (seeded). Logit std ≈ 2, a peaked distribution like a trained LM's."""
    generator = torch.Generator().manual_seed(seed)
    dtype = shape.torch_dtype
    head_std = 2.0 / shape.hidden**0.5
    student_head = _gaussian_head((shape.vocab, shape.hidden), dtype, head_std, generator)
    teacher_head = _gaussian_head((shape.vocab, shape.hidden), dtype, head_std, generator)
    student_hidden = torch.randn(shape.batch, shape.seq, shape.hidden, generator=generator)  # B, T, H
    # The teacher sees a related but different state: its distribution differs, so the KL is far from zero.
    noise = torch.randn(shape.batch, shape.seq, shape.hidden, generator=generator)
    teacher_hidden = 0.8 * student_hidden + 0.6 * noise  # B, T, H
    # Prompts of varying length, then `response` prediction positions, then right padding.
    prompt_lengths = torch.randint(
        16, shape.seq - shape.response - 16, (shape.batch,), generator=generator
    )  # B
    positions = torch.arange(shape.seq)  # T
    prediction_mask = (positions >= prompt_lengths[:, None]) & (
        positions < prompt_lengths[:, None] + shape.response
    )  # B, T
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator)  # B, T
    labels = labels.masked_fill(~prediction_mask, IGNORE_INDEX)
    return Inputs(
        student_hidden=student_hidden.to(dtype).requires_grad_(True),
        teacher_hidden=teacher_hidden.to(dtype),
        student_head=student_head.requires_grad_(trainable_head),
        teacher_head=teacher_head,
        labels=labels,
        prediction_mask=prediction_mask,
    )


def naive_loss(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, τ²·KL sum, total) the textbook way: every position through the head and both softmaxes."""
    vocab = inputs.student_head.shape[0]
    student_logits = (inputs.student_hidden @ inputs.student_head.T).float()  # B, T, H -> B, T, V
    with torch.no_grad():
        teacher_logits = (inputs.teacher_hidden @ inputs.teacher_head.T).float()  # B, T, H -> B, T, V
    ce = F.cross_entropy(
        student_logits.view(-1, vocab), inputs.labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )  # B·T, V -> []
    student_logp = F.log_softmax(student_logits / TEMPERATURE, dim=-1)  # B, T, V
    teacher_logp = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)  # B, T, V
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)  # B, T, V -> B, T
    kd = (kl * inputs.prediction_mask).sum() * TEMPERATURE**2  # B, T -> []
    return ce, kd, ce + KD_WEIGHT * kd


def cached_topk_rows(inputs: Inputs) -> TopKTeacher:
    """What the prepare stage caches: top-k at τ of the teacher's response rows, made a few rows at a time."""
    with torch.no_grad():
        teacher_rows = gather_response_rows(inputs.teacher_hidden, inputs.prediction_mask)  # N, H
        parts = [
            teacher_topk(rows @ inputs.teacher_head.T, TOP_K, TEMPERATURE)  # 32, H -> 32, V -> 32, k
            for rows in teacher_rows.split(32)
        ]
    return TopKTeacher(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]))  # N, k


def cmkd_loss(
    inputs: Inputs, chunk_size: int, topk: TopKTeacher | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, τ²·KL sum, total) as the loop computes them: gather rows, teacher rows, chunked loss."""
    student_rows = gather_response_rows(inputs.student_hidden, inputs.prediction_mask)  # B, T, H -> N, H
    targets = gather_response_rows(inputs.labels, inputs.prediction_mask)  # B, T -> N
    if topk is None:
        with torch.no_grad():  # OnlineTeacherRows: only the response rows reach the teacher's head
            teacher_rows = gather_response_rows(inputs.teacher_hidden, inputs.prediction_mask)  # N, H
            teacher: torch.Tensor | TopKTeacher = teacher_rows @ inputs.teacher_head.T  # N, H -> N, V
    else:
        teacher = topk
    parts = chunked_kd_loss(
        student_rows,
        inputs.student_head,
        targets,
        teacher,
        temperature=TEMPERATURE,
        kd_weight=KD_WEIGHT,
        chunk_size=chunk_size,
    )
    return parts.ce, parts.kd, parts.total


def child_run(variant: str, shape: LossShape, trainable_head: bool, grad_path: Path | None) -> None:
    """The measured part, in its own process: prints one JSON line for the parent."""
    inputs = build_inputs(shape, trainable_head)
    topk = cached_topk_rows(inputs) if variant == "cmkd-topk" else None
    result: dict[str, float | int] = {"baseline_rss": peak_rss_bytes()}
    if variant != "baseline":
        start = time.perf_counter()
        if variant == "naive":
            ce, kd, total = naive_loss(inputs)
        else:
            ce, kd, total = cmkd_loss(inputs, CHUNK_SIZE[variant], topk)
        total.backward()
        result.update(seconds=time.perf_counter() - start, ce=ce.item(), kd=kd.item(), total=total.item())
        if grad_path is not None:
            assert inputs.student_hidden.grad is not None
            torch.save(inputs.student_hidden.grad.float(), grad_path)
    result["peak_rss"] = peak_rss_bytes()
    print(json.dumps(result))


@dataclass
class Measurement:
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)  # bytes, the variant's process
    baseline_rss: list[int] = field(default_factory=list)  # bytes, the baseline process of the same round
    losses: dict[str, float] = field(default_factory=dict)
    grad_path: Path | None = None

    @property
    def peak_over_inputs(self) -> int:
        """The loss's own peak: the largest difference to the same round's baseline."""
        return max(peak - base for peak, base in zip(self.peak_rss, self.baseline_rss, strict=True))


@dataclass(frozen=True)
class ChildSettings:
    trainable_head: bool
    fixed_malloc: bool


def run_child(
    variant: str, shape: LossShape, settings: ChildSettings, grad_path: Path | None
) -> dict[str, float]:
    child = [sys.executable, __file__, "--child", variant, json.dumps(asdict(shape))]
    if settings.trainable_head:
        child.append("--trainable-head")
    if grad_path is not None:
        child += ["--grad-path", str(grad_path)]
    env = {**os.environ, **(FIXED_MALLOC_ENV if settings.fixed_malloc else {})}
    done = subprocess.run(child, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} on {shape.name} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:,.0f}"


def compare(naive: Measurement, other: Measurement) -> dict[str, float]:
    """Largest differences to the naive loss: each summed part, and the hidden states' gradient."""
    result = {part: abs(naive.losses[part] - other.losses[part]) for part in ("ce", "kd", "total")}
    if naive.grad_path is not None and other.grad_path is not None:
        naive_grad, other_grad = torch.load(naive.grad_path), torch.load(other.grad_path)
        result["grad"] = float((naive_grad - other_grad).abs().max())
        result["grad_rel"] = result["grad"] / max(float(naive_grad.abs().max()), 1e-30)
    return result


def render(
    measurements: dict[tuple[str, str], Measurement],
    shapes: list[LossShape],
    variants: list[str],
    info: dict[str, str],
    command: str,
    rounds: int,
    settings: ChildSettings,
) -> str:
    head_text = (
        "trainable (its gradient counts)" if settings.trainable_head else "frozen (LoRA / projector training)"
    )
    malloc_text = (
        "with a fixed 1 MiB glibc mmap threshold (RSS follows live tensors)"
        if settings.fixed_malloc
        else "with glibc's default malloc (freed chunks may stay in the heap)"
    )
    lines = [
        "# KD loss: chunked response rows vs the naive full-sequence loss",
        "",
        generated_line(command),
        "",
        f"Forward + backward of CE + λ·τ²·KL (λ = {KD_WEIGHT}, τ = {TEMPERATURE}) from final hidden states and LM",
        f"heads; the student's LM head is {head_text}. Peak = max RSS of the variant's own process minus that of",
        f"a baseline process that only allocates the inputs, {malloc_text}; largest over rounds. Time = median of",
        f"{rounds} interleaved round(s), one fresh process per measurement. Targets (issue): peak ≤ 0.25x naive,",
        "time ≤ 1.0x naive, same loss.",
        "",
        "Variants:",
        "",
    ]
    lines += [f"- `{name}`: {VARIANTS[name]}" for name in variants]
    lines += ["", "Shapes:", ""]
    for shape in shapes:
        inputs_mib = _mib(statistics.median(measurements[(shape.name, variants[0])].baseline_rss))
        lines.append(
            f"- `{shape.name}`: {shape.note}; H = {shape.hidden}, V = {shape.vocab:,}, batch {shape.batch} × seq "
            f"{shape.seq} with {shape.response} response positions per example (N = {shape.batch * shape.response} "
            f"loss rows of {shape.batch * shape.seq} positions), {shape.dtype}; process with inputs: {inputs_mib} MiB"
        )
    lines += [
        "",
        "| shape | variant | peak MiB | peak vs naive | time s (median) | time s (all rounds) | time vs naive "
        "| CE sum | τ²·KL sum | abs diff vs naive: CE / KL | hidden-grad max abs diff (rel) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        naive = measurements.get((shape.name, "naive"))
        for variant in variants:
            m = measurements[(shape.name, variant)]
            seconds = statistics.median(m.seconds)
            peak_ratio = time_ratio = loss_diff = grad_diff = "-"
            if naive is not None:
                peak_ratio = f"{m.peak_over_inputs / max(naive.peak_over_inputs, 1):.3f}x"
                time_ratio = f"{seconds / statistics.median(naive.seconds):.2f}x"
                if variant == "cmkd-topk":
                    loss_diff = grad_diff = "different loss (sparse KL)"
                elif variant != "naive":
                    diff = compare(naive, m)
                    loss_diff = f"{diff['ce']:.1e} / {diff['kd']:.1e}"
                    if "grad" in diff:
                        grad_diff = f"{diff['grad']:.1e} ({diff['grad_rel']:.1e})"
            all_rounds = ", ".join(f"{s:.2f}" for s in m.seconds)
            lines.append(
                f"| {shape.name} | {variant} | {_mib(m.peak_over_inputs)} | {peak_ratio} | {seconds:.2f} | "
                f"{all_rounds} | {time_ratio} | {m.losses['ce']:.3f} | {m.losses['kd']:.3f} | {loss_diff} | "
                f"{grad_diff} |"
            )
    lines += ["", *render_machine(info, command)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated: {', '.join(SHAPES)}"
    )
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved repetitions; the median is reported"
    )
    parser.add_argument(
        "--trainable-head", action="store_true", help="the student's LM head gets a gradient (full fine-tune)"
    )
    parser.add_argument(
        "--glibc-default-malloc", action="store_true", help="measure RSS without the fixed mmap threshold"
    )
    add_threads_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kd_loss.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: variant, shape JSON
    parser.add_argument("--grad-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_run(args.child[0], LossShape(**json.loads(args.child[1])), args.trainable_head, args.grad_path)
        return

    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "naive" in variants:  # the reference goes first in every round
        variants = ["naive", *[v for v in variants if v != "naive"]]
    settings = ChildSettings(args.trainable_head, fixed_malloc=not args.glibc_default_malloc)
    apply_threads(args.threads)
    info = machine_info()
    command = command_line()
    measurements = {(s.name, v): Measurement() for s in shapes for v in variants}
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-kd-loss-") as scratch:
        for shape in shapes:
            for round_index in range(args.rounds):
                baseline = int(run_child("baseline", shape, settings, None)["peak_rss"])
                for variant in variants:
                    entry = measurements[(shape.name, variant)]
                    grad_path = Path(scratch) / f"{shape.name}-{variant}.pt" if round_index == 0 else None
                    result = run_child(variant, shape, settings, grad_path)
                    entry.seconds.append(result["seconds"])
                    entry.peak_rss.append(int(result["peak_rss"]))
                    entry.baseline_rss.append(baseline)
                    entry.losses = {key: result[key] for key in ("ce", "kd", "total")}
                    entry.grad_path = entry.grad_path or grad_path
                    print(f"{shape.name:12s} round {round_index + 1}: {variant:13s} {result['seconds']:7.2f} s  "
                          f"peak {_mib(result['peak_rss'] - baseline):>6s} MiB  load {load_average()}",
                          flush=True)  # fmt: skip
        report = render(measurements, shapes, variants, info, command, args.rounds, settings)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
