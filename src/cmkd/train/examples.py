"""Training examples and the deterministic stream of micro-batches the loop consumes.

An example is one question with the response tokens both channels train on (the teacher's ŷ, or the gold y for
the ablation) and its spoken clips. The T→T view gives the student the text prompt; the S→T view gives it one of
the clips (a different voice per epoch when there are several). The teacher's view is always the text prompt.

The order is a pure function of (seed, epoch, position): that is what makes "re-run the same command" resume
exactly where a killed run stopped, and what lets each rank take its own slice without communication.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cmkd.data.records import PairedRecord, resolve_audio_path
from cmkd.data.speech_inputs import SpeechInputs
from cmkd.errors import UserError
from cmkd.models.speech_lm import Prompt
from cmkd.stage_configs import CETarget

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainExample:
    item_id: str
    system: str | None
    text: str
    audio_paths: tuple[Path, ...]  # every clip of the question, in manifest order
    response_ids: tuple[int, ...]  # without the end-of-turn token, which the models append
    audio_keys: tuple[str, ...] = ()  # the same clips as manifest paths (the feature cache's keys)

    def text_prompt(self) -> Prompt:
        return Prompt(system=self.system, text=self.text)

    def speech_prompt(self, seed: int, epoch: int, speech: SpeechInputs) -> Prompt:
        """The clip for this epoch: a deterministic pick, so several voices rotate across epochs."""
        if not self.audio_paths:
            raise UserError(f"{self.item_id}/speech: no clip for the S→T channel")
        pick = zlib.crc32(f"{seed}:{epoch}:{self.item_id}".encode()) % len(self.audio_paths)
        key = self.audio_keys[pick] if self.audio_keys else None
        try:
            return speech.prompt(self.system, self.audio_paths[pick], key)
        except UserError as err:  # the reader names the file; the user also needs the record and the field
            raise UserError(f"{self.item_id}/speech.audio: {err}") from None


def build_examples(
    records: Sequence[PairedRecord],
    *,
    root: Path,
    tokenizer: object,
    ce_target: CETarget,
    system_prompt: str | None,
    need_speech: bool,
) -> list[TrainExample]:
    """Turn manifest records into examples; every problem names the record and the field."""
    examples: list[TrainExample] = []
    without_speech: list[str] = []
    for record in records:
        system = record.system if record.system is not None else system_prompt
        if ce_target is CETarget.GOLD:
            if not record.target:
                raise UserError(
                    f"{record.id}/target: loss.ce_target is gold but the record has no gold answer"
                )
            response_ids = tokenizer.encode(record.target, add_special_tokens=False)  # type: ignore[attr-defined]
        else:
            stored = getattr(record, "teacher_response_ids", None)
            if stored:
                response_ids = list(stored)
            elif record.teacher_response:
                # Re-tokenising decoded text may differ from the generated ids; prepare stores the ids.
                response_ids = tokenizer.encode(record.teacher_response, add_special_tokens=False)  # type: ignore[attr-defined]
            else:
                raise UserError(
                    f"{record.id}/teacher.response: missing; run `cmkd prepare` with a teacher first"
                )
        audio_paths = tuple(resolve_audio_path(root, clip.audio, record.id) for clip in record.speech)
        if need_speech and not audio_paths:
            without_speech.append(record.id)  # every clip failed the ASR check in prepare
            continue
        keys = tuple(clip.audio for clip in record.speech)
        examples.append(
            TrainExample(record.id, system, record.prompt, audio_paths, tuple(response_ids), keys)
        )
    if without_speech:
        logger.warning(
            "%d record(s) without any clip are left out of training (S→T is on): %s",
            len(without_speech),
            ", ".join(without_speech[:10]) + (" ..." if len(without_speech) > 10 else ""),
        )
    if not examples:
        raise UserError("data.train_manifest: holds no training records (with speech, when S→T is on)")
    return examples


@functools.lru_cache(maxsize=4)
def epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_examples, generator=generator).tolist())


def example_at(position: int, n_examples: int, seed: int) -> tuple[int, int]:
    """(example index, epoch) of the `position`-th example of the endless, epoch-by-epoch shuffled stream."""
    epoch, offset = divmod(position, n_examples)
    return epoch_order(n_examples, seed, epoch)[offset], epoch


def micro_batches(
    start: int, *, n_examples: int, batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int
) -> list[list[tuple[int, int]]]:
    """The (index, epoch) pairs of one optimizer step for this rank, starting at global stream position `start`.

    A step consumes batch_size × grad_accum × world_size positions; rank r takes every world_size-th one, so ranks
    see disjoint examples and the global batch is the same whatever the number of processes.
    """
    per_step = batch_size * grad_accum * world_size
    positions = range(start + rank, start + per_step, world_size)
    picks = [example_at(position, n_examples, seed) for position in positions]
    return [picks[i : i + batch_size] for i in range(0, len(picks), batch_size)]
