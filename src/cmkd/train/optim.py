"""Optimizer groups and the learning-rate schedule.

Each trainable part gets its own peak learning rate (a fresh projector wants ~1e-3, LoRA ~1e-4, full LM weights
~5e-6 as in the paper), all on one shared warmup + decay shape so one scheduler serves them all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmkd.errors import UserError
from cmkd.stage_configs import Schedule, TrainSettings


def build_optimizer(groups: dict[str, list[nn.Parameter]], train: TrainSettings) -> torch.optim.AdamW:
    learning_rates = {
        "projector": train.lr,
        "lora": train.lora_lr,
        "lm": train.lm_lr,
        "encoder": train.encoder_lr,
    }
    param_groups = []
    for name, params in sorted(groups.items()):
        if name not in learning_rates:
            raise ValueError(f"parameter group '{name}' has no learning rate setting")
        param_groups.append({"params": params, "lr": learning_rates[name], "name": name})
    if not param_groups:
        raise UserError(
            "student: nothing is trainable (frozen LM, encoder and no projector); check student.lm_mode"
        )
    return torch.optim.AdamW(param_groups, weight_decay=train.weight_decay)


def lr_multiplier(
    step: int, *, total_steps: int, warmup_steps: int, schedule: Schedule, min_ratio: float
) -> float:
    """Linear warmup to 1, then decay to `min_ratio` at `total_steps` (cosine, linear) or stay at 1 (constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule is Schedule.CONSTANT:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule is Schedule.COSINE:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def multiplier(step: int) -> float:
        return lr_multiplier(
            step,
            total_steps=total_steps,
            warmup_steps=train.warmup_steps,
            schedule=train.schedule,
            min_ratio=train.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
