"""End to end: `cmkd train` on the embedded default vs a naive reference loop written here, same model and data.

Claim checked (issue 8, item 4): the real loop (`cmkd.train.loop.run_training`) trains ≥ 2x the response tokens
per second of a naive distillation loop and needs ≤ 0.5x its peak memory. Both train the demo's stage-B student
(Whisper tiny.en + the posterior connector + SmolLM2-135M-Instruct with LoRA r = 8; `--connector stack_mlp` for the
frame projector) on the demo's stage-B objective: S→T + T→T, teacher CE + 0.5·τ²·KL at τ = 2, speech share 0.5,
the same examples in the same order (same seed, batch, steps), from the same initial weights.

- `cmkd`: `run_training` itself, unchanged, on a TrainConfig built like `cmkd demo`'s stage B: teacher rows
  read from the top-64 logit cache `cmkd prepare` wrote (the teacher model is never loaded), one teacher row set
  per micro-batch for both channels, CE + KD on response rows only, chunked (`loss.chunk_size`), and speech
  inputs from the prepare-stage feature cache (built here for the student's connector with the library's own
  writer, as `cmkd prepare` would: Whisper posteriors for `posterior`, encoder frames for `stack_mlp`).
- `naive`: the loop most KD code starts as, written out below with the same student, optimizer and scheduler:
  the SmolLM2 teacher runs online, once per channel (its input is the same text both times); student and
  teacher produce full [B, T, V] logits, and the float32 log-softmax of both is taken over every position before
  the response rows are picked out; the audio goes through Whisper on every step (no feature cache; the
  in-process posterior memo is cleared before each S→T pass).

tokens/s is the loop's own metric: response tokens (ŷ + end of turn) x channels / step wall time (teacher,
speech front end, forward, backward, optimizer step); tokens per CPU-second divides by the process's CPU time
instead, which other jobs on a shared 2-core machine disturb far less. Runs cover whole epochs (default 2, as in
the paper), and the whole-run figure is Σ tokens / Σ step seconds, so one-off costs of the first epoch count as
they would in a real run. Each variant runs in its own process, so its peak RSS (VmHWM) is its own; a baseline
process that only builds the student, reads its weights once (checkpoints are memory-mapped) and reads the data
gives what every variant holds anyway, and "above baseline" is what training adds. The step-1 CE per token of
both loops is reported as a check that they train the same thing (same weights, same batch; only the KD term
differs: dense online rows vs the sparse top-64 cache).

Two optional variants give evidence for changes beyond the shipped defaults: `cmkd-ckpt` (activation
checkpointing of the student's LM, not a config option yet) and `cmkd-bf16` (`train.mixed_precision=bf16`).

    python benchmarks/bench_end_to_end.py --threads 1                     # 24 questions, batch 8, 2 epochs
    python benchmarks/bench_end_to_end.py --threads 1 --variants naive,cmkd,cmkd-ckpt,cmkd-bf16
    python benchmarks/bench_end_to_end.py --threads 1 --data runs/demo/data --questions 32 --rounds 2
    python benchmarks/bench_end_to_end.py --threads 1 --connector stack_mlp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from bench_demo_data import add_data_argument, build_feature_cache, copy_subset, prepared_root

from cmkd.config import load_config
from cmkd.stage_configs import TrainConfig

MIB = 2**20
SYSTEM_PROMPT = "Answer the question in a few words."  # the demo's (cmkd.demo.SYSTEM_PROMPT)
TARGETS = {"tokens/s": 2.0, "peak memory": 0.5}
VARIANTS = ("naive", "cmkd", "cmkd-ckpt", "cmkd-bf16")
LABELS = {
    "naive": "the naive reference loop: online teacher once per channel, full fp32 [B, T, V] log-softmax of "
    "student and teacher, audio through Whisper on every step",
    "cmkd": "`cmkd train` as shipped (the headline): cached top-64 teacher rows, chunked response-row loss, "
    "speech from the feature cache",
    "cmkd-ckpt": "`cmkd train` + activation checkpointing of the LM (evidence for a proposed option: patched into "
    "the built student in that process, which is also put in training mode)",
    "cmkd-bf16": "`cmkd train` + `train.mixed_precision=bf16` (an existing option: CPU autocast, this CPU has AMX "
    "bf16); not like for like with the fp32 naive loop",
}


def train_overrides(data_root: Path, out_dir: Path, steps: int, batch_size: int, connector: str) -> list[str]:
    """The demo's stage-B TrainConfig (cmkd.demo: `_student_overrides`, `_train_config`, `STAGE_B`), from the
    untrained connector instead of a stage-A checkpoint (a step costs the same either way)."""
    connector_lr = ["train.lr=1e-4"] if connector == "posterior" else []  # the demo's posterior residual lr
    return [
        f"run.out_dir={out_dir}",
        f"data.root={data_root}",
        "student.lm=smollm2",
        "student.encoder=whisper-tiny.en",
        "student.lm_mode=lora",
        "student.lora.r=8",
        f"student.projector.kind={connector}",
        "teacher.model=smollm2",
        f"teacher.system_prompt={SYSTEM_PROMPT}",
        "teacher.logits_top_k=64",
        "teacher.logits_temperature=2.0",
        f"train.steps={steps}",
        f"train.batch_size={batch_size}",
        "train.warmup_steps=5",
        *connector_lr,
        "train.lora_lr=5e-4",
        f"train.save_every={steps}",
        "train.log_every=1",
        "train.teacher_source=cache",
        # STAGE_B:
        "train.text_to_text=true",
        "train.speech_to_text=true",
        "train.speech_share=0.5",
        "loss.ce_target=teacher",
        "loss.kd_weight=0.5",
        "loss.temperature=2.0",
    ]


# ---------------------------------------------------------------------------------------------------------------
# What a child reports
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class E2ERun:
    """One training process (one micro-batch per step, one process)."""

    variant: str
    step_seconds: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)  # per step: ŷ tokens + end of turn
    teacher_seconds: list[float] = field(default_factory=list)  # per step: teacher passes, or the cache read
    speech_seconds: list[float] = field(default_factory=list)  # per step: Whisper encoder or decode
    first_step_ce: dict[str, float] = field(default_factory=dict)  # per channel, per response token
    speech_from_cache: int = 0
    speech_from_audio: int = 0
    teacher_examples: int = 0  # examples the teacher ran on (or were read from the cache)
    step_cpu_seconds: list[float] = field(default_factory=list)  # per step: this process's CPU time
    student_positions: dict[str, int] = field(default_factory=dict)  # padded B·T per channel, whole run
    teacher_positions: int = 0  # padded B·T of the teacher passes, whole run (0: cache)
    lm_params: int = 0
    trainable_params: int = 0
    total_seconds: float = 0.0  # the whole child: build, steps, save
    peak_rss: int = 0

    def tokens_per_s(self, channels: int = 2) -> list[float]:
        return [n * channels / s for n, s in zip(self.response_tokens, self.step_seconds, strict=True)]


class SpeechTimer:
    """Times the student's speech front end (Whisper encoder, or the posterior decode) from outside the library.

    Wraps `cmkd.models.composable.posterior_features` and `WhisperSpeechEncoder.forward` in this (child) process;
    a call inside a timed call (the decode runs the encoder) is not counted twice."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def _timed(self, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start

        return wrapper

    def install(self) -> None:
        from cmkd.models import composable, encoder

        composable.posterior_features = self._timed(composable.posterior_features)  # type: ignore[attr-defined]
        encoder.WhisperSpeechEncoder.forward = self._timed(encoder.WhisperSpeechEncoder.forward)  # type: ignore[method-assign]

    def lap(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _positions(mask: torch.Tensor) -> int:
    return int(mask.shape[0] * mask.shape[1])  # B, T: padded positions, what the LM computes over


# ---------------------------------------------------------------------------------------------------------------
# The real loop
# ---------------------------------------------------------------------------------------------------------------


def child_cmkd(overrides: list[str], variant: str = "cmkd") -> E2ERun:
    """`run_training` unchanged; its teacher-rows provider and speech front end are timed from outside.

    `cmkd-ckpt` turns on the LM's activation checkpointing (not a config option yet: patched into the built
    student in this child); `cmkd-bf16` sets `train.mixed_precision=bf16` (autocast; the CPU has AMX)."""
    from cmkd.data import speech_inputs
    from cmkd.models import build
    from cmkd.train import loop

    if variant == "cmkd-bf16":
        overrides = [*overrides, "train.mixed_precision=bf16"]
    if variant == "cmkd-ckpt":
        build_student = build.build_student

        def checkpointed_student(*args: Any, **kwargs: Any) -> Any:
            student = build_student(*args, **kwargs)
            student._causal_lm().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            return student.train()  # checkpointing acts in training mode only, which run_training never sets

        build.build_student = checkpointed_student  # type: ignore[assignment]  # this (child) process only
    cfg = load_config(TrainConfig, None, overrides)
    run = E2ERun(variant)
    speech = SpeechTimer()
    speech.install()
    speech_laps: list[float] = []  # speech seconds between teacher calls: one call starts every step
    cpu_marks: list[float] = []
    opened: list[Any] = []
    original_open = speech_inputs.SpeechInputs.open.__func__  # type: ignore[attr-defined]

    def recording_open(cls: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(original_open(cls, *args, **kwargs))
        return opened[-1]

    speech_inputs.SpeechInputs.open = classmethod(recording_open)  # type: ignore[method-assign, assignment]
    build_teacher_rows = loop.build_teacher_rows
    counters: list[Any] = []

    def timed_build_teacher_rows(cfg: TrainConfig, student: Any, teacher: Any = None) -> tuple[Any, int]:
        provider, vocab_rows = build_teacher_rows(cfg, student, teacher)
        counters.append(provider.counter)
        run.lm_params = sum(p.numel() for p in student.lm.parameters())
        run.trainable_params = sum(p.numel() for p in student.parameters() if p.requires_grad)

        def timed(examples: Any) -> Any:
            speech_laps.append(speech.lap())
            cpu_marks.append(time.process_time())  # a step starts with its teacher call
            start = time.perf_counter()
            rows = provider(examples)
            run.teacher_seconds.append(time.perf_counter() - start)
            return rows

        return timed, vocab_rows

    loop.build_teacher_rows = timed_build_teacher_rows  # this (child) process only
    step_metrics = loop._step_metrics

    def cpu_timed_step_metrics(*args: Any, **kwargs: Any) -> Any:
        run.step_cpu_seconds.append(time.process_time() - cpu_marks[-1])  # and ends when it is measured
        return step_metrics(*args, **kwargs)

    loop._step_metrics = cpu_timed_step_metrics
    start = time.perf_counter()
    loop.run_training(cfg, cfg.run.out_dir, progress=False)
    run.total_seconds = time.perf_counter() - start
    speech_laps.append(speech.lap())
    run.speech_seconds = speech_laps[1:]  # lap i + 1 ran during step i
    run.teacher_examples = counters[0].examples
    metrics = [json.loads(line) for line in (cfg.run.out_dir / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        # The loop logs response tokens x channels / step seconds; the tokens come from its own data stream.
        tokens = _step_tokens(cfg, int(row["step"]))
        run.response_tokens.append(tokens)
        run.step_seconds.append(tokens * 2 / row["tokens_per_s"])
    run.first_step_ce = {channel: metrics[0][f"{channel}/ce"] for channel in ("t2t", "s2t")}
    if opened:
        run.speech_from_cache = opened[0].read_from_cache
        run.speech_from_audio = opened[0].read_from_audio
    run.peak_rss = peak_rss_bytes()
    return run


def _step_tokens(cfg: TrainConfig, step: int) -> int:
    """Response tokens of optimizer step `step` (1-based), from the deterministic stream the loop reads."""
    from cmkd.data.records import read_manifest
    from cmkd.train.examples import micro_batches

    records = [r for r in read_manifest(cfg.data.root / cfg.data.train_manifest) if r.speech]
    tokens = [len(r.teacher_response_ids or []) + 1 for r in records]
    (batch,) = micro_batches(
        (step - 1) * cfg.train.batch_size,
        n_examples=len(tokens),
        batch_size=cfg.train.batch_size,
        grad_accum=1,
        rank=0,
        world_size=1,
        seed=cfg.run.seed,
    )
    return sum(tokens[index] for index, _ in batch)


# ---------------------------------------------------------------------------------------------------------------
# The naive reference loop
# ---------------------------------------------------------------------------------------------------------------


def naive_loss(
    student_logits: torch.Tensor,
    student_mask: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_mask: torch.Tensor,
    temperature: float,
    kd_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ τ²·KL(p_T‖p_S)) over response rows, computed the naive way: fp32 log-softmax of every position of
    both [B, T, V] tensors first, response rows picked out afterwards (rows line up by mask: prompts differ)."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1)  # B, T, V
    student_logp_t = F.log_softmax(student_logits.float() / temperature, dim=-1)  # B, T, V
    teacher_logp_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # B, T_t, V
    ce = -student_logp[student_mask].gather(-1, targets[student_mask].unsqueeze(-1)).sum()  # N, V -> []
    teacher_rows = teacher_logp_t[teacher_mask]  # N, V
    kl = (teacher_rows.exp() * (teacher_rows - student_logp_t[student_mask])).sum()  # N, V -> []
    return ce, kd_weight * temperature**2 * kl


def child_naive(overrides: list[str]) -> E2ERun:
    """The reference loop: same student, data order, optimizer and schedule as `run_training`, naive inside."""
    from cmkd.data.audio import load_audio
    from cmkd.data.records import read_manifest
    from cmkd.models import composable
    from cmkd.models.build import build_student, build_teacher
    from cmkd.models.speech_lm import Prompt
    from cmkd.train.examples import build_examples, micro_batches
    from cmkd.train.loop import channels
    from cmkd.train.optim import build_optimizer, build_scheduler

    start = time.perf_counter()
    cfg = load_config(TrainConfig, None, overrides)
    run = E2ERun("naive")
    speech = SpeechTimer()
    speech.install()
    torch.manual_seed(cfg.run.seed)  # as run_training: the same LoRA initialisation
    student = build_student(cfg.student)
    teacher = build_teacher(cfg.teacher)
    run.lm_params = sum(p.numel() for p in student.lm.parameters())
    run.trainable_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    examples = build_examples(
        read_manifest(cfg.data.root / cfg.data.train_manifest),
        root=cfg.data.root,
        tokenizer=student.tokenizer,
        ce_target=cfg.loss.ce_target,
        system_prompt=cfg.teacher.system_prompt,
        need_speech=True,
    )
    optimizer = build_optimizer(student.parameter_groups(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.steps)
    student.train()
    clips: dict[Path, Any] = {}  # decoded FLAC is kept, as the real loop keeps it; encoding it is not
    active = channels(cfg)
    tau, kd_weight = cfg.loss.temperature, cfg.loss.kd_weight
    position = 0
    for step in range(cfg.train.steps):
        (batch,) = micro_batches(
            position,
            n_examples=len(examples),
            batch_size=cfg.train.batch_size,
            grad_accum=1,
            rank=0,
            world_size=1,
            seed=cfg.run.seed,
        )
        batch_examples = [examples[index] for index, _ in batch]
        responses = [list(example.response_ids) for example in batch_examples]
        n_tokens = sum(len(response) + 1 for response in responses)
        text_prompts = [example.text_prompt() for example in batch_examples]
        step_start, cpu_start = time.perf_counter(), time.process_time()
        speech.lap()
        teacher_seconds = 0.0
        for channel, weight in active:
            teacher_start = time.perf_counter()
            teacher_out = teacher.forward(text_prompts, responses)  # logits B, T_t, V (no grad)
            teacher_seconds += time.perf_counter() - teacher_start
            run.teacher_examples += len(batch_examples)
            run.teacher_positions += _positions(teacher_out.prediction_mask)
            if channel == "t2t":
                prompts = text_prompts
            else:
                composable._POSTERIOR_MEMO.clear()  # no feature cache: Whisper runs on every step
                prompts = []
                for example, (_, epoch) in zip(batch_examples, batch, strict=True):
                    pick = zlib.crc32(f"{cfg.run.seed}:{epoch}:{example.item_id}".encode())
                    path = example.audio_paths[pick % len(example.audio_paths)]  # the loop's clip pick
                    if path not in clips:
                        clips[path] = load_audio(path)
                    prompts.append(Prompt(system=example.system, audio=clips[path]))
            output = student(prompts, responses)  # logits B, T, V
            run.student_positions[channel] = run.student_positions.get(channel, 0) + _positions(
                output.prediction_mask
            )
            ce, kd = naive_loss(
                output.logits,
                output.prediction_mask,
                output.targets,
                teacher_out.logits,
                teacher_out.prediction_mask.to(output.logits.device),
                tau,
                kd_weight,
            )
            (weight * (cfg.loss.ce_weight * ce + kd) / n_tokens).backward()
            if step == 0:
                run.first_step_ce[channel] = ce.item() / n_tokens
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position += cfg.train.batch_size
        run.step_seconds.append(time.perf_counter() - step_start)
        run.step_cpu_seconds.append(time.process_time() - cpu_start)
        run.response_tokens.append(n_tokens)
        run.teacher_seconds.append(teacher_seconds)
        run.speech_seconds.append(speech.lap())
        print(
            f"naive step {step + 1}: {n_tokens * len(active) / run.step_seconds[-1]:.1f} tokens/s", flush=True
        )
    run.total_seconds = time.perf_counter() - start
    run.speech_from_audio = cfg.train.steps * cfg.train.batch_size  # every S→T prompt, every step
    run.peak_rss = peak_rss_bytes()
    return run


def child_baseline(overrides: list[str]) -> E2ERun:
    """What every variant holds before training: Python, torch, transformers, the student's weights (read once,
    since safetensors checkpoints are memory-mapped and count in RSS only when touched), the examples."""
    from cmkd.data.records import read_manifest
    from cmkd.models.build import build_student
    from cmkd.train.examples import build_examples

    cfg = load_config(TrainConfig, None, overrides)
    torch.manual_seed(cfg.run.seed)
    student = build_student(cfg.student)
    build_examples(
        read_manifest(cfg.data.root / cfg.data.train_manifest),
        root=cfg.data.root,
        tokenizer=student.tokenizer,
        ce_target=cfg.loss.ce_target,
        system_prompt=cfg.teacher.system_prompt,
        need_speech=True,
    )
    with torch.no_grad():  # fault every weight page in: loaded checkpoints are memory-mapped until first read
        sum(float(param.sum()) for param in student.parameters())
    return E2ERun("baseline", peak_rss=peak_rss_bytes())


def run_child(variant: str, child_args: list[str]) -> E2ERun:
    """`--child VARIANT ...` in a fresh process (offline); its last stdout line is its E2ERun."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, *child_args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {variant} run failed:\n{done.stderr[-3000:]}")
    return E2ERun(**json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the parent made and measured before the runs."""

    questions: int
    steps: int
    steps_per_epoch: float
    mean_response_tokens: float
    mean_clip_seconds: float
    cache_clips: int
    cache_seconds: float


def _epochs_of(steps: int, batch_size: int, questions: int) -> list[int]:
    """Epoch of each step (that of its first example)."""
    return [step * batch_size // questions for step in range(steps)]


def whole_run_rate(run: E2ERun, cpu: bool = False) -> float:
    """Σ response tokens x 2 channels / Σ step seconds (wall, or this process's CPU time)."""
    return 2 * sum(run.response_tokens) / sum(run.step_cpu_seconds if cpu else run.step_seconds)


def _median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _verdict(value: float, target: float, higher_is_better: bool) -> str:
    if (value >= target) if higher_is_better else (value <= target):
        return f"met ({value:.2f}x)"
    short = target / value if higher_is_better else value / target
    return f"MISSED ({value:.2f}x; {short:.2f}x {'short' if higher_is_better else 'over'})"


def render(
    runs: dict[str, list[E2ERun]],
    baseline: E2ERun,
    setup: Setup,
    args: argparse.Namespace,
    info: dict[str, str],
    command: str,
) -> str:
    epochs = _epochs_of(setup.steps, args.batch_size, setup.questions)
    naive = runs["naive"]
    naive_rate = statistics.median(whole_run_rate(run) for run in naive)
    naive_cpu_rate = statistics.median(whole_run_rate(run, cpu=True) for run in naive)
    naive_peak = max(run.peak_rss for run in naive)
    lines = [
        "# End to end: `cmkd train` vs a naive reference loop",
        "",
        generated_line(command),
        "",
        f"The demo's stage-B run on the embedded default: Whisper tiny.en + **{args.connector}** connector + "
        "SmolLM2-135M-Instruct with LoRA r = 8, S→T + T→T, teacher CE + 0.5·τ²·KL at τ = 2, speech share 0.5, "
        f"teacher SmolLM2. {setup.questions} demo training questions (hibari speech, mean clip "
        f"{setup.mean_clip_seconds:.1f} s; ŷ mean {setup.mean_response_tokens:.1f} tokens + end of turn), batch "
        f"{args.batch_size}, {setup.steps} steps = {args.epochs:g} epochs ({setup.steps_per_epoch:g} steps each), "
        f"{args.rounds} round(s) of each variant, one fresh process per run, same seed, data order and initial "
        "weights.",
        "",
        "Variants:",
        "",
        *[f"- `{variant}`: {LABELS[variant]}" for variant in runs],
        "",
        "tokens/s = response tokens x 2 channels / step wall time (teacher, speech front end, forward, backward, "
        "optimizer step), the loop's own metric; per CPU-s = the same over this process's CPU time, which other "
        "jobs on a shared machine disturb far less (one torch thread). Whole run = Σ tokens / Σ step seconds over "
        "every step, first-epoch costs included; epoch columns = median step of that epoch. Speech s = Whisper "
        "time per step (encoder or posterior decode); teacher s = teacher passes, or the cache read. Peak = the "
        "process's VmHWM; baseline = a process that builds the student, reads its weights once and reads the "
        f"data ({baseline.peak_rss / MIB:,.0f} MiB). The feature cache for the `cmkd` runs was built before them "
        f"({setup.cache_clips} clips in {setup.cache_seconds:.0f} s, the prepare stage's job; not in any timing).",
        "",
        "| variant | tokens/s whole run | vs naive | tokens per CPU-s whole run | vs naive (CPU) | tokens/s epoch 1 "
        "(median) | tokens/s later epochs (median) | teacher s per step | speech s per step | teacher examples | "
        "S→T inputs from cache / audio | step-1 CE per token T→T / S→T | peak RSS MiB | above baseline MiB | peak "
        "vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, entries in runs.items():
        for run in entries:
            rates = run.tokens_per_s()
            first = [rate for rate, epoch in zip(rates, epochs, strict=True) if epoch == 0]
            later = [rate for rate, epoch in zip(rates, epochs, strict=True) if epoch > 0]
            lines.append(
                f"| {variant} | {whole_run_rate(run):.1f} | {whole_run_rate(run) / naive_rate:.2f}x | "
                f"{whole_run_rate(run, cpu=True):.1f} | {whole_run_rate(run, cpu=True) / naive_cpu_rate:.2f}x | "
                f"{_median_or_nan(first):.1f} | {_median_or_nan(later):.1f} | "
                f"{statistics.median(run.teacher_seconds):.3f} | {statistics.median(run.speech_seconds):.2f} | "
                f"{run.teacher_examples} | {run.speech_from_cache} / {run.speech_from_audio} | "
                f"{run.first_step_ce.get('t2t', math.nan):.4f} / {run.first_step_ce.get('s2t', math.nan):.4f} | "
                f"{run.peak_rss / MIB:,.0f} | {(run.peak_rss - baseline.peak_rss) / MIB:,.0f} | "
                f"{run.peak_rss / naive_peak:.2f}x |"
            )
    lines += ["", *render_verdicts(runs, baseline, naive_rate, naive_cpu_rate, naive_peak), ""]
    lines += [*render_why(runs, baseline), ""]
    lines += [
        *render_breakdown(runs, epochs),
        "",
        "Per-step tokens/s: "
        + "; ".join(
            f"{run.variant} {', '.join(f'{rate:.1f}' for rate in run.tokens_per_s())}"
            for entries in runs.values()
            for run in entries
        ),
        "",
        *render_machine(info, command),
    ]
    return "\n".join(lines) + "\n"


def render_verdicts(
    runs: dict[str, list[E2ERun]], baseline: E2ERun, naive_rate: float, naive_cpu_rate: float, naive_peak: int
) -> list[str]:
    """The targets for `cmkd train` as shipped, and what the extra variants would make of them."""
    lines = []
    for variant, entries in runs.items():
        if variant == "naive":
            continue
        speed = statistics.median(whole_run_rate(run) for run in entries) / naive_rate
        cpu_speed = statistics.median(whole_run_rate(run, cpu=True) for run in entries) / naive_cpu_rate
        peak = max(run.peak_rss for run in entries)
        above = (peak - baseline.peak_rss) / max(naive_peak - baseline.peak_rss, 1)
        lines.append(
            f"- `{variant}`{' (the shipped loop)' if variant == 'cmkd' else ''}: target ≥ {TARGETS['tokens/s']:g}x "
            f"tokens/s {_verdict(speed, TARGETS['tokens/s'], True)}, per CPU-s "
            f"{_verdict(cpu_speed, TARGETS['tokens/s'], True)}; target ≤ {TARGETS['peak memory']:g}x peak memory "
            f"{_verdict(peak / naive_peak, TARGETS['peak memory'], False)} (above the baseline process: "
            f"{above:.2f}x)."
        )
    return lines


def render_why(runs: dict[str, list[E2ERun]], baseline: E2ERun) -> list[str]:
    """Why the shipped loop lands where it does, from the measured parts of a step (medians, CPU seconds)."""
    naive, ours = runs["naive"], runs["cmkd"]

    def median(entries: list[E2ERun], name: str) -> float:
        return statistics.median(value for run in entries for value in getattr(run, name))

    naive_step, our_step = median(naive, "step_cpu_seconds"), median(ours, "step_cpu_seconds")
    teacher, speech = median(naive, "teacher_seconds"), median(naive, "speech_seconds")
    loss = naive_step - our_step - teacher - speech
    naive_peak, our_peak = max(r.peak_rss for r in naive), max(r.peak_rss for r in ours)
    lines = [
        "## Why",
        "",
        f"- Speed: a naive step took {naive_step:.1f} CPU-s and a `cmkd` step {our_step:.1f} (medians). The shipped "
        f"loop removes what the naive loop adds: the two teacher passes ({teacher:.1f} s wall), Whisper on every step "
        f"({speech:.1f} s wall) and, in the remaining {loss:.1f} s, the full-vocabulary heads and fp32 log-softmax of "
        f"both models. What is left, {our_step:.1f} s, is the student's own forward + backward over both channels, "
        "which every loop must do; so the speed-up is capped near "
        f"{naive_step:.1f} / {our_step:.1f} = {naive_step / our_step:.2f}x, and 2x would need the naive loop's extras "
        f"to cost at least as much as the student itself ({our_step:.1f} s; they cost "
        f"{naive_step - our_step:.1f} s). With a 135M teacher next to a LoRA student and 14-token answers that is "
        "not so here (bench_paper_scale.py prices the 7B case the same way).",
        f"- Memory: the baseline process alone (Python, torch, the student's weights and the data) holds "
        f"{baseline.peak_rss / MIB:,.0f} MiB, and the student's activations for backward come on top in every loop "
        f"(`cmkd` peaks {(our_peak - baseline.peak_rss) / MIB:,.0f} MiB above the baseline). The naive loop adds its "
        f"own teacher and the [B, T, V] float32 buffers ({(naive_peak - our_peak) / MIB:,.0f} MiB more), so even a "
        f"loop with no KD cost at all would sit at about {our_peak / naive_peak:.2f}x.",
    ]
    if "cmkd-ckpt" in runs:
        ckpt = runs["cmkd-ckpt"]
        ckpt_peak = max(r.peak_rss for r in ckpt)
        ckpt_step = median(ckpt, "step_cpu_seconds")
        lines.append(
            f"- Activation checkpointing of the student's LM (`cmkd-ckpt`) is what shrinks the shared part: "
            f"{ckpt_peak / MIB:,.0f} MiB peak = {ckpt_peak / naive_peak:.2f}x the naive loop, for "
            f"{ckpt_step / our_step:.2f}x the CPU time per step. It is not a `cmkd train` option yet, and "
            "`run_training` never puts the student in training mode (transformers loads models in eval mode), "
            "which checkpointing needs (and LoRA dropout, were it above 0)."
        )
    return lines


def render_breakdown(runs: dict[str, list[E2ERun]], epochs: list[int]) -> list[str]:
    """Where a step's time goes, per variant and epoch (medians over steps and runs)."""
    lines = [
        "## Where a step's time goes",
        "",
        "Median seconds per step (wall); rest = student forward + loss + backward + optimizer step.",
        "",
        "| variant | epoch | step s | step CPU s | teacher s | speech s | rest s |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, entries in runs.items():
        for epoch in sorted(set(epochs)):
            rows = [
                (step, cpu, teacher, speech)
                for run in entries
                for step, cpu, teacher, speech, step_epoch in zip(
                    run.step_seconds,
                    run.step_cpu_seconds,
                    run.teacher_seconds,
                    run.speech_seconds,
                    epochs,
                    strict=True,
                )
                if step_epoch == epoch
            ]
            step_s, cpu_s, teacher_s, speech_s = (statistics.median(row[i] for row in rows) for i in range(4))
            rest = statistics.median(row[0] - row[2] - row[3] for row in rows)
            lines.append(
                f"| {variant} | {epoch + 1} | {step_s:.2f} | {cpu_s:.2f} | {teacher_s:.3f} | {speech_s:.2f} | "
                f"{rest:.2f} |"
            )
    return lines


def write_sidecar(path: Path, runs: dict[str, list[E2ERun]], baseline: E2ERun, setup: Setup) -> None:
    """The measurements as JSON, for bench_paper_scale.py's CPU cross-check."""
    data = {
        "setup": asdict(setup),
        "baseline_peak_rss": baseline.peak_rss,
        "runs": {variant: [asdict(run) for run in entries] for variant, entries in runs.items()},
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--questions", type=int, default=24, help="demo training questions (spread over categories)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (the demo's)")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over the questions (the paper's 2)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=["naive", "cmkd"],
        help=f"comma-separated, naive first; of {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--connector",
        choices=("posterior", "stack_mlp"),
        default="posterior",
        help="the speech connector (the demo's is posterior)",
    )
    add_data_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "end_to_end.md")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)  # internal: one run
    args = parser.parse_args()
    if args.variants[0] != "naive" or not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants: naive first, then any of {', '.join(VARIANTS[1:])}")
    if args.child:
        variant, data_root, out_dir, steps, batch_size, connector = args.child
        overrides = train_overrides(Path(data_root), Path(out_dir), int(steps), int(batch_size), connector)
        if variant == "naive":
            run = child_naive(overrides)
        elif variant == "baseline":
            run = child_baseline(overrides)
        else:
            run = child_cmkd(overrides, variant)
        print(json.dumps(asdict(run)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_threads(args.threads)
    info = machine_info()
    command = command_line()
    source = prepared_root(args.data)
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-e2e-") as scratch_name:
        scratch = Path(scratch_name)
        data_root = scratch / "data"
        records = copy_subset(
            source, data_root, "train.jsonl", args.questions, lambda voice: voice == "hibari"
        )
        steps = math.ceil(args.epochs * len(records) / args.batch_size)
        cfg = load_config(TrainConfig, None, train_overrides(data_root, scratch / "x", steps, args.batch_size,
                                                              args.connector))  # fmt: skip
        from cmkd.models.build import build_student

        cache_clips, cache_seconds = build_feature_cache(
            data_root, build_student(cfg.student), ["train.jsonl"]
        )
        from cmkd.data.audio import duration_seconds

        setup = Setup(
            questions=len(records),
            steps=steps,
            steps_per_epoch=len(records) / args.batch_size,
            mean_response_tokens=statistics.mean(len(r.teacher_response_ids or []) for r in records),
            mean_clip_seconds=statistics.mean(
                duration_seconds(data_root / r.speech[0].audio) for r in records
            ),
            cache_clips=cache_clips,
            cache_seconds=cache_seconds,
        )
        print(f"setup: {len(records)} questions, {steps} steps, cache {cache_seconds:.0f} s; load {load_average()}",
              flush=True)  # fmt: skip

        def child_args(name: str) -> list[str]:
            return [str(data_root), str(scratch / name), str(steps), str(args.batch_size), args.connector]

        baseline = run_child("baseline", child_args("baseline"))
        runs: dict[str, list[E2ERun]] = {variant: [] for variant in args.variants}
        for round_index in range(args.rounds):
            for variant in args.variants:
                run = run_child(variant, child_args(f"{variant}-{round_index}"))
                runs[variant].append(run)
                print(f"round {round_index + 1}: {variant:5s} tokens/s {', '.join(f'{v:.1f}' for v in run.tokens_per_s())}"
                      f"  peak {run.peak_rss / MIB:,.0f} MiB  load {load_average()}", flush=True)  # fmt: skip
    write_report(args.out, render(runs, baseline, setup, args, info, command))
    write_sidecar(args.out.with_suffix(".json"), runs, baseline, setup)


if __name__ == "__main__":
    main()
