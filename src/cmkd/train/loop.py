"""`cmkd train`: the distillation loop, written out so it can be read in one sitting.

Per optimizer step, on every rank:
  1. take this rank's micro-batches from the deterministic example stream (examples.py);
  2. count the response tokens of the whole step on all ranks first, so each micro-batch's summed loss can be
     divided by that global count before its backward (the exact per-token mean, whatever the accumulation);
  3. per micro-batch: ONE teacher pass (or cache read) on the text prompts, then the student once per channel:
     T→T reads the text prompt, S→T the spoken one; both score the same ŷ, so their rows line up with the
     teacher's by mask (checked), never by position;
  4. loss = CE(ŷ) + λ·τ²·KL on response rows only, chunked (no [B, T, V] fp32 logits), channel-weighted;
  5. clip, step, schedule; log; checkpoint everything needed to resume bit-for-bit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmkd.config import to_dict
from cmkd.data.audio import load_audio
from cmkd.data.speech_inputs import SpeechInputs
from cmkd.errors import UserError
from cmkd.losses import check_aligned, chunked_kd_loss, gather_response_rows, normalise
from cmkd.stage_configs import LMMode, MixedPrecision, TrainConfig
from cmkd.torch_threads import restores_torch_threads
from cmkd.train.examples import TrainExample, build_examples, micro_batches
from cmkd.train.metrics_log import MetricsLog, TrainProgress
from cmkd.train.optim import build_optimizer, build_scheduler
from cmkd.train.setup import build_teacher_rows, load_train_records
from cmkd.train.state import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from cmkd.train.teacher_rows import rows_to

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    state: TrainState
    student_dir: Path
    last_metrics: dict[str, float]
    teacher_examples: int  # examples the teacher ran on (or were read from the cache): once per example


def config_fingerprint(cfg: TrainConfig) -> str:
    """What must match for a checkpoint to be resumed: everything but run-time conveniences."""
    data = to_dict(cfg)
    for key in ("overwrite", "threads"):
        data["run"].pop(key, None)
    data["train"].pop("max_minutes", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def total_steps(cfg: TrainConfig, n_examples: int, world_size: int) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world_size
    return max(1, math.ceil(cfg.train.epochs * n_examples / per_step))


def channels(cfg: TrainConfig) -> list[tuple[str, float]]:
    """(name, loss weight) per active channel; S→T last, so the step's final backward touches every trainable."""
    active = []
    if cfg.train.text_to_text:
        active.append(("t2t", 1.0 - cfg.train.speech_share if cfg.train.speech_to_text else 1.0))
    if cfg.train.speech_to_text:
        active.append(("s2t", cfg.train.speech_share if cfg.train.text_to_text else 1.0))
    return active


def enable_activation_checkpointing(student: Any) -> None:
    """Checkpoint the student's transformers LM layer by layer (non-reentrant: frozen inputs need no grad)."""
    lm = getattr(student, "lm", None) or getattr(student, "model", None)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise UserError(
            f"train.activation_checkpointing: {type(student).__name__} has no transformers LM to checkpoint"
        )
    logger.info("activation checkpointing on for %s", type(lm).__name__)


@restores_torch_threads
def run_training(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    student: Any = None,
    teacher: Any = None,
    progress: bool = True,
) -> TrainResult:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if cfg.student.lm_mode is LMMode.FROZEN and not cfg.train.speech_to_text:
        raise UserError(
            "train.speech_to_text: off with student.lm_mode=frozen leaves nothing to train (T→T only trains the LM)"
        )
    if cfg.train.mixed_precision is MixedPrecision.FP16 and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on a CPU")
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision.value,
        cpu=not torch.cuda.is_available(),
        # With S→T last in every step its backward reaches every trainable; T→T alone never reaches the projector.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not cfg.train.speech_to_text)],
    )
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)

    if student is None:
        from cmkd.models.build import build_student

        student = build_student(cfg.student, trust_remote_code=cfg.run.trust_remote_code)
    records = load_train_records(cfg)
    examples = build_examples(
        records,
        root=cfg.data.root,
        tokenizer=student.tokenizer,
        ce_target=cfg.loss.ce_target,
        system_prompt=cfg.teacher.system_prompt,
        need_speech=cfg.train.speech_to_text,
    )
    teacher_rows, vocab_rows = build_teacher_rows(cfg, student, teacher)
    steps_total = total_steps(cfg, len(examples), accelerator.num_processes)
    logger.info(
        "training %d steps on %d process(es), %d examples, channels %s",
        steps_total,
        accelerator.num_processes,
        len(examples),
        [name for name, _ in channels(cfg)],
    )

    optimizer = build_optimizer(student.parameter_groups(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps_total)
    # The scheduler stays ours: accelerate's wrapper steps it once per process, which would change the schedule
    # with the number of processes; ours counts optimizer steps of the global batch.
    model, optimizer = accelerator.prepare(student, optimizer)
    student = accelerator.unwrap_model(model)
    # transformers loads models in eval mode; the students' train() keeps their frozen parts in eval.
    student.train()
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(student)

    checkpoints = run_dir / "checkpoints"
    fingerprint = config_fingerprint(cfg)
    state = TrainState(config_fingerprint=fingerprint)
    resume_from = None if cfg.run.overwrite else latest_checkpoint(checkpoints)
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, student=student, optimizer=optimizer, scheduler=scheduler, fingerprint=fingerprint
        )
        logger.info("resuming from %s (step %d)", resume_from, state.step)
    metrics = MetricsLog(run_dir, enabled=accelerator.is_main_process, resume_step=state.step)
    active_channels = channels(cfg)
    audio = SpeechInputs.open(
        cfg.data.root if cfg.train.speech_to_text else None,
        student,
        functools.partial(load_audio, max_seconds=cfg.data.max_audio_seconds),
        "train",
    )
    started = time.monotonic() - state.elapsed_seconds
    last: dict[str, float] = {}

    with TrainProgress(steps_total, state.step, enabled=progress and accelerator.is_main_process) as bar:
        while state.step < steps_total:
            if cfg.train.max_minutes and time.monotonic() - started > 60 * cfg.train.max_minutes:
                logger.info("train.max_minutes reached at step %d", state.step)
                break
            batches = micro_batches(
                state.position,
                n_examples=len(examples),
                batch_size=cfg.train.batch_size,
                grad_accum=cfg.train.grad_accum,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                seed=cfg.run.seed,
            )
            # 2. The step's response tokens on all ranks (each channel scores every example once).
            local_tokens = sum(len(examples[i].response_ids) + 1 for batch in batches for i, _ in batch)
            global_tokens = accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum")
            sums = {f"{name}/{part}": 0.0 for name, _ in active_channels for part in ("ce", "kd")}
            step_start = time.monotonic()
            for batch_index, batch in enumerate(batches):
                batch_examples = [examples[i] for i, _ in batch]
                # 3. One teacher pass (or cache read) serves every channel of this micro-batch.
                teacher_out = teacher_rows(batch_examples) if teacher_rows is not None else (None, None)
                rows, teacher_mask = teacher_out
                rows = rows_to(rows, accelerator.device) if rows is not None else None
                for channel_index, (channel, weight) in enumerate(active_channels):
                    last_backward = (
                        batch_index == len(batches) - 1 and channel_index == len(active_channels) - 1
                    )
                    sync = contextlib.nullcontext() if last_backward else accelerator.no_sync(model)
                    with sync:  # gradients are all-reduced once, on the step's last backward
                        with accelerator.autocast():
                            parts = _channel_loss(
                                model,
                                student,
                                cfg,
                                channel,
                                batch,
                                batch_examples,
                                rows,
                                teacher_mask,
                                audio,
                                vocab_rows,
                            )
                            loss = weight * normalise(parts.total, global_tokens, accelerator.num_processes)
                        if not torch.isfinite(parts.total):
                            ids = ", ".join(e.item_id for e in batch_examples)
                            raise UserError(
                                f"train: non-finite loss at step {state.step + 1}, channel {channel}, items [{ids}]; "
                                f"stopped; the last good checkpoint is {latest_checkpoint(checkpoints) or 'none'}"
                            )
                        if loss.requires_grad:  # T→T with a frozen LM only measures (nothing in it trains)
                            accelerator.backward(loss)
                    sums[f"{channel}/ce"] += parts.ce.item()
                    sums[f"{channel}/kd"] += parts.kd.item()
            # 5. Clip, step, schedule.
            if cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.position += cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
            n_global = int(global_tokens.item())
            if accelerator.num_processes > 1:  # log the global means, not this rank's share
                keys = sorted(sums)
                totals = accelerator.reduce(
                    torch.tensor([sums[k] for k in keys], device=accelerator.device), "sum"
                )
                sums = dict(zip(keys, totals.tolist(), strict=True))
            state.tokens_seen += n_global * len(active_channels)
            state.elapsed_seconds = time.monotonic() - started
            last = _step_metrics(
                sums, n_global, active_channels, cfg, optimizer, time.monotonic() - step_start
            )
            bar.update(state.step, last)
            if state.step % cfg.train.log_every == 0 or state.step == steps_total:
                metrics.write(state.step, last)
            if state.step % cfg.train.save_every == 0 or state.step == steps_total:
                _save(accelerator, checkpoints, state, student, optimizer, scheduler)

    if state.step < steps_total:  # stopped by the time limit: keep what was learnt
        _save(accelerator, checkpoints, state, student, optimizer, scheduler)
    student_dir = run_dir / "student"
    if accelerator.is_main_process:
        student.save(student_dir)
    accelerator.wait_for_everyone()
    metrics.close()
    counter = getattr(teacher_rows, "counter", None)
    return TrainResult(state, student_dir, last, counter.examples if counter else 0)


def _channel_loss(
    model: Any,
    student: Any,
    cfg: TrainConfig,
    channel: str,
    batch: list[tuple[int, int]],
    batch_examples: list[TrainExample],
    teacher_rows: Any,
    teacher_mask: torch.Tensor | None,
    audio: SpeechInputs,
    vocab_rows: int,
) -> Any:
    """One channel's summed CE + λ·τ²·divergence over the response rows of one micro-batch."""
    if channel == "t2t":
        prompts = [example.text_prompt() for example in batch_examples]
    else:
        prompts = [
            ex.speech_prompt(cfg.run.seed, epoch, audio)
            for ex, (_, epoch) in zip(batch_examples, batch, strict=True)
        ]
    responses = [list(example.response_ids) for example in batch_examples]
    output = model(prompts, responses, return_hidden=True)
    if teacher_mask is not None:
        check_aligned(
            output.prediction_mask,
            teacher_mask.to(output.prediction_mask.device),
            [e.item_id for e in batch_examples],
        )
    hidden = gather_response_rows(output.hidden, output.prediction_mask)  # N, H
    targets = gather_response_rows(output.targets, output.prediction_mask)  # N
    if teacher_rows is not None and hidden.shape[0] != _n_rows(teacher_rows):
        raise UserError(
            f"response_mask: {hidden.shape[0]} student rows vs {_n_rows(teacher_rows)} teacher rows"
        )
    kd_weight = cfg.loss.kd_weight if teacher_rows is not None else 0.0
    return chunked_kd_loss(
        hidden,
        student.lm_head_weight()[:vocab_rows],
        targets,
        teacher_rows,
        temperature=cfg.loss.temperature,
        kd_weight=kd_weight,
        ce_weight=cfg.loss.ce_weight,
        divergence=cfg.loss.divergence,
        jsd_beta=cfg.loss.jsd_beta,
        chunk_size=cfg.loss.chunk_size,
    )


def _n_rows(teacher_rows: Any) -> int:
    return int(teacher_rows[0].shape[0]) if isinstance(teacher_rows, tuple) else int(teacher_rows.shape[0])


def _step_metrics(
    sums: dict[str, float],
    n_tokens: int,
    active_channels: list[tuple[str, float]],
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    seconds: float,
) -> dict[str, float]:
    """Per-token means per channel over the whole step (sums already reduced over ranks)."""
    row: dict[str, float] = {key: value / max(n_tokens, 1) for key, value in sums.items()}
    total = 0.0
    for name, weight in active_channels:
        row[f"{name}/loss"] = row[f"{name}/ce"] * cfg.loss.ce_weight + row[f"{name}/kd"] * cfg.loss.kd_weight
        total += weight * row[f"{name}/loss"]
    row["loss"] = total
    row["tokens_per_s"] = n_tokens * len(active_channels) / max(seconds, 1e-9)
    for group in optimizer.param_groups:
        row[f"lr/{group.get('name', 'group')}"] = group["lr"]
    return row


def _save(
    accelerator: Any, checkpoints: Path, state: TrainState, student: Any, optimizer: Any, scheduler: Any
) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(checkpoints, state, student=student, optimizer=optimizer, scheduler=scheduler)
    accelerator.wait_for_everyone()
