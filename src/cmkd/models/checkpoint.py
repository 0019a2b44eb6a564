"""Student checkpoints: only the trainable tensors (safetensors) plus a JSON naming the frozen parts.

Shared by every `SpeechLM` so that all students save the same way: the frozen encoder, LM or HF model are named,
never copied; loading is strict (every key and shape must match), and a mismatch names the key and, through
`hint`, the setting that explains it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmkd.errors import UserError

WEIGHTS_FILE = "trainable.safetensors"
META_FILE = "student.json"
CHECKPOINT_FORMAT = 1


def save_trainable(
    directory: Path,
    parameters: Sequence[tuple[str, nn.Parameter]],
    *,
    kind: str,
    frozen_parts: dict[str, str],
    settings: dict[str, Any],
) -> Path:
    """Write the tensors and the JSON under temporary names first, so a crash never leaves a half checkpoint."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().cpu().contiguous() for name, param in parameters}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "frozen_parts": frozen_parts,
        "settings": settings,
        "tensors": {name: list(tensor.shape) for name, tensor in tensors.items()},
    }
    weights_tmp, meta_tmp = directory / (WEIGHTS_FILE + ".tmp"), directory / (META_FILE + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"format": f"cmkd-student-{CHECKPOINT_FORMAT}"})
    meta_tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    weights_tmp.replace(directory / WEIGHTS_FILE)
    meta_tmp.replace(directory / META_FILE)
    return directory


def load_trainable(
    directory: Path,
    parameters: Sequence[tuple[str, nn.Parameter]],
    *,
    kind: str,
    hint: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Copy saved tensors into `parameters`, strictly; return the checkpoint's JSON for further checks."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights_path, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    if not weights_path.is_file() or not meta_path.is_file():
        raise UserError(
            f"checkpoint {directory}: needs {WEIGHTS_FILE} and {META_FILE} (written by a cmkd student)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("kind") != kind:
        raise UserError(f"checkpoint {directory}: holds a '{meta.get('kind')}' student, not a {kind} one")
    saved, own = load_file(str(weights_path)), dict(parameters)
    why = hint(meta)
    for name in sorted(own.keys() | saved.keys()):
        if name not in saved:
            raise UserError(f"checkpoint {directory}: key '{name}' is missing{why}")
        if name not in own:
            raise UserError(
                f"checkpoint {directory}: key '{name}' is not a trainable tensor of this student{why}"
            )
        if saved[name].shape != own[name].shape:
            raise UserError(
                f"checkpoint {directory}: key '{name}' has shape {list(saved[name].shape)}, this student "
                f"{list(own[name].shape)}{why}"
            )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name])
    return meta
