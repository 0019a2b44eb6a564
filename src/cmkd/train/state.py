"""All loop state in one object, saved with the trainable weights so that re-running a command resumes it.

A checkpoint directory holds the student's trainable weights (safetensors, via `SpeechLM.save`) and
`train_state.pt`: step, stream position, optimizer and scheduler state, RNG states and the config fingerprint.
It is written under a temporary name and renamed, then `latest` is switched atomically: a kill at any moment
leaves the previous checkpoint whole. `torch.load` runs with `weights_only=True` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmkd.errors import UserError

STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    position: int = 0  # examples consumed from the global stream (all ranks)
    tokens_seen: int = 0  # response tokens trained on, all ranks, per channel summed
    elapsed_seconds: float = 0.0
    config_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints_dir: Path,
    state: TrainState,
    *,
    student: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int = 2,
) -> Path:
    """Write `step-XXXXXX/` atomically, point `latest` at it, keep the newest `keep` checkpoints."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{state.step:06d}"
    staging = checkpoints_dir / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    student.save(staging)
    payload = {
        "state": asdict(state),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    # Through a Python file object, so a full disk surfaces as the OSError behind torch's RuntimeError.
    with open(staging / STATE_FILE, "wb") as handle:
        torch.save(payload, handle)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _write_latest(checkpoints_dir, final.name)
    for old in sorted(checkpoints_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_latest(checkpoints_dir: Path, name: str) -> None:
    tmp = checkpoints_dir / f".{LATEST_FILE}.tmp"
    tmp.write_text(json.dumps({"checkpoint": name}))
    os.replace(tmp, checkpoints_dir / LATEST_FILE)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    directory = checkpoints_dir / json.loads(pointer.read_text())["checkpoint"]
    return directory if (directory / STATE_FILE).is_file() else None


def load_checkpoint(
    directory: Path, *, student: Any, optimizer: torch.optim.Optimizer, scheduler: Any, fingerprint: str
) -> TrainState:
    """Restore everything the loop needs to continue bit-for-bit; refuse a checkpoint from another config."""
    payload = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    state = TrainState(**payload["state"])
    if state.config_fingerprint != fingerprint:
        raise UserError(
            f"checkpoint '{directory}': was made by a different training config; use a new run.out_dir "
            "or pass --overwrite to start over"
        )
    student.load(directory)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return state
