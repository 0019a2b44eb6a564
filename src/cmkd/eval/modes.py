"""The ways one item is asked (modes), the per-item result files, and one batch of work for a mode.

A mode is (model, input): the teacher on the text; the student on the text; the student on each spoken clip; the
ASR cascade (ASR transcript -> teacher text); the student on ANOTHER item's clip (the mismatched-audio control:
what a student scores when it cannot be using the audio). Extra students (an untrained projector, a baseline)
get their own text and speech modes. All modes answer the same items, which is what makes every gap paired.

Each mode writes `<run>/items/<mode>.jsonl`, one row per (item, voice), appended batch by batch with one write +
fsync, so a killed run loses at most the batch in flight; a partial last line is cut off on resume and the
remaining rows are skipped. Rows carry VoiceBench's evaluator fields (`prompt`, `response`, `reference`, and
ifeval's `key`/`instruction_id_list`/`kwargs`) next to ours.

Teacher-forced metrics use the teacher's response ŷ as the continuation: NLL of ŷ under the mode's model given
its input, and KL(p_T(·|text, ŷ<i) ‖ p_model(·|input, ŷ<i)) at τ = 1, both averaged over ŷ's tokens plus the
end-of-turn. Rows of the two passes line up through the prediction masks (prompts differ in length), checked
with `cmkd.losses.check_aligned`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cmkd.config import StrEnum
from cmkd.data.audio import load_audio
from cmkd.data.jsonl_io import ParseError, Reject, append_jsonl, read_jsonl
from cmkd.errors import UserError
from cmkd.eval.item_scoring import score_item
from cmkd.eval.judge import JudgeClient
from cmkd.eval.suites import EvalItem
from cmkd.losses import check_aligned, dense_divergence, gather_response_rows, token_ce
from cmkd.models.speech_lm import LMOutput, Prompt, SpeechLM
from cmkd.models.teacher import TextTeacher

if TYPE_CHECKING:
    from cmkd.data.asr_check import ASRBackend
    from cmkd.data.speech_inputs import SpeechInputs

TEACHER, STUDENT = "teacher", "student"


class InputKind(StrEnum):
    TEXT = "text"
    SPEECH = "speech"
    ASR = "asr"  # the cascade: ASR transcript of the clip, read by the teacher
    MISMATCHED = "mismatched"  # another item's clip: the control for "is the audio used at all"


@dataclass(frozen=True)
class ModeSpec:
    """One way of asking: `name` is also the items file stem (teacher.text, student.speech, cascade.asr, ...)."""

    name: str
    model: str
    input: InputKind

    @property
    def per_voice(self) -> bool:
        return self.input in (InputKind.SPEECH, InputKind.ASR)


def plan_modes(
    extra_students: Sequence[str], *, cascade: bool, mismatched: bool, speech_only: Collection[str] = ()
) -> list[ModeSpec]:
    """Modes in run order: the teacher first (its answers feed agreement and stand in for a missing ŷ).

    `speech_only`: extra students asked only in speech (a control such as an untrained connector, whose text
    answers are the base LM's, already measured)."""
    modes = [
        ModeSpec(f"{TEACHER}.text", TEACHER, InputKind.TEXT),
        ModeSpec(f"{STUDENT}.text", STUDENT, InputKind.TEXT),
        ModeSpec(f"{STUDENT}.speech", STUDENT, InputKind.SPEECH),
    ]
    if cascade:
        modes.append(ModeSpec("cascade.asr", TEACHER, InputKind.ASR))
    if mismatched:
        modes.append(ModeSpec(f"{STUDENT}.mismatched", STUDENT, InputKind.MISMATCHED))
    for name in extra_students:
        if name not in speech_only:
            modes.append(ModeSpec(f"{name}.text", name, InputKind.TEXT))
        modes.append(ModeSpec(f"{name}.speech", name, InputKind.SPEECH))
    return modes


@dataclass(frozen=True)
class WorkUnit:
    """One answer to produce: `item` asked in a mode; `voice` and `audio_item` say whose clip is played."""

    item: EvalItem
    voice: str = ""
    audio_item: EvalItem | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.item.id, self.voice


def derangement(count: int, seed: int) -> list[int]:
    """A random permutation with no fixed point (Sattolo's algorithm: one cycle through all items)."""
    order = list(range(count))
    rng = random.Random(f"cmkd-mismatched:{seed}")
    for index in range(count - 1, 0, -1):
        other = rng.randrange(index)  # < index: never swap an item with itself
        order[index], order[other] = order[other], order[index]
    return order


def plan_units(
    mode: ModeSpec, items: Sequence[EvalItem], unusable: set[tuple[str, str]], seed: int
) -> list[WorkUnit]:
    """Every unit a mode must answer; clips in `unusable` (missing files) are left out (recorded by the caller)."""
    if mode.input is InputKind.TEXT:
        return [WorkUnit(item) for item in items]
    if mode.per_voice:
        return [
            WorkUnit(item, voice, item)
            for item in items
            for voice in item.clips()
            if (item.id, voice) not in unusable
        ]
    voiced = [(item, voices[0]) for item in items if (voices := _usable_voices(item, unusable))]
    if len(voiced) < 2:
        return []
    donors = derangement(len(voiced), seed)
    return [
        WorkUnit(item, voiced[donor][1], voiced[donor][0])
        for (item, _), donor in zip(voiced, donors, strict=True)
    ]


def _usable_voices(item: EvalItem, unusable: set[tuple[str, str]]) -> list[str]:
    return [voice for voice in item.clips() if (item.id, voice) not in unusable]


# ---------------------------------------------------------------------------------------------------------------
# Per-item result files
# ---------------------------------------------------------------------------------------------------------------


class ItemsFile:
    """`<run>/items/<mode>.jsonl`: rows appended per batch, read back keyed by (id, voice) to resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _cut_partial_tail(self) -> None:
        """Drop a last line without its newline (a writer killed mid-line): its item is simply recomputed."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
                handle.flush()
                os.fsync(handle.fileno())

    def load(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Rows written so far; a damaged line in the middle is a UserError (something else wrote the file)."""
        self._cut_partial_tail()
        if not self.path.is_file():
            return {}
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for line_no, value in read_jsonl(self.path):
            if isinstance(value, ParseError):
                raise UserError(
                    f"{self.path}:{line_no}: damaged line ({value.reason}); delete the file to recompute this mode"
                )
            rows[(str(value.get("id")), str(value.get("voice") or ""))] = value
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        append_jsonl(self.path, rows)


# ---------------------------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BatchContext:
    """Everything a batch needs besides its units; `answer_model` is the model of the mode being run."""

    mode: ModeSpec
    teacher: TextTeacher
    answer_model: TextTeacher | SpeechLM
    system_prompt: str
    max_new_tokens: int
    max_audio_seconds: float
    response_ids: Callable[[EvalItem], list[int] | None]
    teacher_answer: Callable[[EvalItem], str | None]
    judge: JudgeClient | None = None
    asr: ASRBackend | None = None
    word_error_rate: Callable[[str, str], float] | None = None
    shared_vocab: bool = True
    teacher_forced: bool = True
    speech: SpeechInputs | None = None  # the answer model's speech inputs (cached features or audio)


_NO_PLAIN_HEAD = (UserError, AttributeError, NotImplementedError)
"""What a student's `lm_head_weight()` raises for a head with a bias or soft-capping, or when it exposes none."""


def _plain_head_weight(model: TextTeacher | SpeechLM) -> torch.Tensor | None:
    """[V, H] when logits are exactly hidden @ W^T, else None (then the full logits are taken)."""
    if isinstance(model, TextTeacher):  # its lm_head_weight() does not check for a bias or soft-capping
        head = model.model.get_output_embeddings()
        plain = getattr(head, "bias", None) is None and not getattr(
            model.model.config, "final_logit_softcapping", None
        )
        return head.weight if plain else None
    try:
        return model.lm_head_weight()
    except _NO_PLAIN_HEAD:
        return None


def _response_rows(
    model: TextTeacher | SpeechLM, prompts: list[Prompt], responses: list[list[int]]
) -> LMOutput:
    """Teacher-forced pass returning logits of the prediction rows only: LMOutput.logits is [N, V] here.

    Projects gathered final hidden states with the LM head when that is exact (N rows instead of B*T)."""
    head = _plain_head_weight(model)
    if head is None:
        out = model.forward(prompts, responses)
        assert out.logits is not None
        return LMOutput(
            gather_response_rows(out.logits, out.prediction_mask), None, out.prediction_mask, out.targets
        )
    out = model.forward(prompts, responses, return_hidden=True)
    assert out.hidden is not None
    hidden_rows = gather_response_rows(out.hidden, out.prediction_mask)  # N, H
    logits = hidden_rows.to(head.dtype) @ head.T  # N, H -> N, V
    return LMOutput(logits, None, out.prediction_mask, out.targets)


def teacher_forced_metrics(
    context: BatchContext,
    units: Sequence[WorkUnit],
    prompts: list[Prompt],
    fallback_ids: Sequence[list[int]] | None = None,
) -> list[tuple[float | None, float | None, int]]:
    """(KL, NLL, tokens) per unit, per response token; (None, None, 0) where no ŷ is known.

    `fallback_ids` stand in for a missing ŷ (the teacher's answers of this very batch, in the teacher mode).
    Without a shared vocabulary only the teacher's own passes are scored: ŷ's ids mean nothing to the student."""
    targets = [context.response_ids(unit.item) for unit in units]
    if fallback_ids is not None:
        targets = [ids if ids is not None else list(fallback_ids[i]) for i, ids in enumerate(targets)]
    if not context.shared_vocab and context.answer_model is not context.teacher:
        return [(None, None, 0)] * len(units)
    scored = [index for index, ids in enumerate(targets) if ids is not None]
    results: list[tuple[float | None, float | None, int]] = [(None, None, 0)] * len(units)
    if not scored:
        return results
    responses = [list(targets[index] or []) for index in scored]
    model_prompts = [prompts[index] for index in scored]
    text_prompts = [
        Prompt(_system(context, units[index]), text=units[index].item.record.prompt) for index in scored
    ]
    ids = [units[index].item.id for index in scored]
    model_is_teacher_on_text = (
        context.answer_model is context.teacher and context.mode.input is InputKind.TEXT
    )
    with torch.inference_mode():
        model_out = _response_rows(context.answer_model, model_prompts, responses)
        teacher_out = None
        if not model_is_teacher_on_text and context.shared_vocab:
            teacher_out = _response_rows(context.teacher, text_prompts, responses)
            check_aligned(model_out.prediction_mask, teacher_out.prediction_mask, ids)
        row_targets = gather_response_rows(model_out.targets, model_out.prediction_mask)  # N
        counts = model_out.prediction_mask.sum(dim=1).tolist()  # B
        assert model_out.logits is not None
        model_rows = model_out.logits.float()  # N, V_model
        starts = np.cumsum([0, *counts])
        for position, index in enumerate(scored):
            rows = slice(int(starts[position]), int(starts[position + 1]))
            n_rows = counts[position]
            nll = float(token_ce(model_rows[rows], row_targets[rows])) / n_rows
            kl: float | None = 0.0 if model_is_teacher_on_text else None
            if teacher_out is not None and teacher_out.logits is not None:
                vocab = min(model_rows.shape[1], teacher_out.logits.shape[1])
                teacher_rows = teacher_out.logits[rows, :vocab].float()
                kl = float(dense_divergence(model_rows[rows, :vocab], teacher_rows, 1.0)) / n_rows
            results[index] = (kl, nll, n_rows)
    return results


def _system(context: BatchContext, unit: WorkUnit) -> str:
    """The record's own system prompt if it has one, else the eval's: every mode of an item reads the same one."""
    own = unit.item.record.system
    return own if own is not None else context.system_prompt


def _clip_path_and_key(unit: WorkUnit) -> tuple[Path, str]:
    """A speech unit's clip: its absolute path and its manifest path (the feature cache's key)."""
    assert unit.audio_item is not None
    return unit.audio_item.clip_path(unit.voice), unit.audio_item.clips()[unit.voice].audio


def _load_clip(unit: WorkUnit, max_seconds: float) -> np.ndarray:
    assert unit.audio_item is not None
    return load_audio(unit.audio_item.clip_path(unit.voice), max_seconds=max_seconds)


def run_batch(context: BatchContext, units: Sequence[WorkUnit]) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Answer, teacher-force and score one batch of a mode; unreadable clips become rejects, not failures."""
    start, cpu_start = time.perf_counter(), time.process_time()
    mode = context.mode
    rejects: list[Reject] = []
    kept: list[WorkUnit] = []
    audio: list[np.ndarray] = []
    for unit in units:
        if mode.input is InputKind.TEXT:
            kept.append(unit)
            continue
        try:
            audio.append(_load_clip(unit, context.max_audio_seconds))
            kept.append(unit)
        except UserError as err:
            rejects.append(Reject(unit.item.id, f"{mode.name}/{unit.voice}", "audio unreadable", str(err)))
    if not kept:
        return [], rejects
    transcripts: list[str] | None = None
    if mode.input is InputKind.TEXT:
        prompts = [Prompt(_system(context, unit), text=unit.item.record.prompt) for unit in kept]
    elif mode.input is InputKind.ASR:
        transcripts = list(context.asr.transcribe(audio))
        prompts = [Prompt(_system(context, u), text=t) for u, t in zip(kept, transcripts, strict=True)]
    elif context.speech is not None:
        prompts = [
            context.speech.prompt(_system(context, u), *_clip_path_and_key(u), audio=clip)
            for u, clip in zip(kept, audio, strict=True)
        ]
    else:
        prompts = [Prompt(_system(context, u), audio=clip) for u, clip in zip(kept, audio, strict=True)]

    model = context.answer_model
    with torch.inference_mode():
        answer_ids = model.generate_ids(prompts, context.max_new_tokens)
    answers = [text.strip() for text in model.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)]
    is_teacher_text = mode.model == TEACHER and mode.input is InputKind.TEXT
    forced = (
        teacher_forced_metrics(context, kept, prompts, answer_ids if is_teacher_text else None)
        if context.teacher_forced
        else [(None, None, 0)] * len(kept)
    )
    # Wall time is what a user waits; CPU time (all threads of this process) stays comparable on a shared machine.
    seconds = (time.perf_counter() - start) / len(kept)
    cpu_seconds = (time.process_time() - cpu_start) / len(kept)
    rows = []
    for index, unit in enumerate(kept):
        teacher_answer = answers[index] if is_teacher_text else context.teacher_answer(unit.item)
        scored = score_item(
            unit.item,
            answers[index],
            teacher_response=teacher_answer,
            fallback_key=f"{unit.item.id}/{mode.name}/{unit.voice}",
            judge=context.judge,
        )
        kl, nll, n_tokens = forced[index]
        row = _row(unit, mode, answers[index], scored.score, scored.strict, scored.parsed, scored.detail)
        row.update(
            metrics=scored.metrics,
            kl=kl,
            nll=nll,
            n_response_tokens=n_tokens,
            seconds=seconds,
            cpu_seconds=cpu_seconds,
        )
        if transcripts is not None and context.word_error_rate is not None:
            row.update(
                transcript=transcripts[index],
                wer=context.word_error_rate(unit.item.record.prompt, transcripts[index]),
            )
        if mode.input is InputKind.MISMATCHED and unit.audio_item is not None:
            row["audio_from"] = unit.audio_item.id
        if is_teacher_text:
            row["response_ids"] = answer_ids[index]
        rows.append(row)
    return rows, rejects


_VOICEBENCH_PASSTHROUGH = ("key", "instruction_id_list", "kwargs")


def _row(
    unit: WorkUnit, mode: ModeSpec, response: str, score: float, strict: float, parsed: bool, detail: str
) -> dict[str, Any]:
    record = unit.item.record
    row: dict[str, Any] = {
        "id": record.id,
        "mode": mode.name,
        "model": mode.model,
        "input": mode.input.value,
        "voice": unit.voice,
        "subset": unit.item.subset,
        "scorer": unit.item.scoring.value,
        "prompt": record.prompt,
        "response": response,
        "reference": record.answer if unit.item.scoring.value in ("mcq", "binary") else record.target,
        "score": score,
        "strict": strict,
        "parsed": parsed,
        "detail": detail,
    }
    for name in _VOICEBENCH_PASSTHROUGH:
        if name in record.meta:
            row[name] = record.meta[name]
    if isinstance(record.meta.get("id"), str):
        row["source_id"] = record.meta["id"]  # VoiceBench bbh keeps its subtask name there
    return row
