"""`run_eval`: ask every item of a suite in every mode, write per-item rows, then `scores.json`.

Order of work: the suite is loaded and checked first (unknown suite, no items, no audio at all: a UserError
before any model is loaded); then each mode runs over the units it has not answered yet, teacher first. Models
are built only when a mode still has work, so re-running a finished eval just recomputes the scores. Scores are
computed from the rows on disk, never from memory, so a resumed run and an uninterrupted one give the same
numbers (`cmkd.eval.summary` does the statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cmkd.data.jsonl_io import Reject, atomic_write_text, dumps_line
from cmkd.data.speech_inputs import SpeechInputs
from cmkd.errors import UserError
from cmkd.eval.judge import JudgeClient, OpenAICompatibleJudge, judge_skip_reason
from cmkd.eval.modes import (
    TEACHER,
    BatchContext,
    InputKind,
    ItemsFile,
    ModeSpec,
    WorkUnit,
    plan_modes,
    plan_units,
    run_batch,
)
from cmkd.eval.suites import EvalItem, Suite, drop_subsets, judge_subsets, load_suite, missing_clips
from cmkd.eval.summary import summarise
from cmkd.stage_configs import EvalConfig
from cmkd.torch_threads import restores_torch_threads

if TYPE_CHECKING:
    from cmkd.data.asr_check import ASRBackend
    from cmkd.data.posterior_asr import PosteriorWhisperASR
    from cmkd.models.speech_lm import SpeechLM
    from cmkd.models.teacher import TextTeacher

logger = logging.getLogger(__name__)

ITEMS_DIR = "items"
SCORES_FILE = "scores.json"
SKIPPED_FILE = "skipped.jsonl"
_RESERVED_NAMES = frozenset({TEACHER, "student", "cascade"})


@dataclass
class EvalResult:
    """Where the outputs are and what they say: `scores` is the content of `scores.json`."""

    run_dir: Path
    scores_path: Path
    items_dir: Path
    scores: dict[str, Any]

    @property
    def n_skipped(self) -> int:
        return int(self.scores["skipped_items"]["total"])


class _Models:
    """Teacher, students and ASR, built on first use: a finished run re-scored loads nothing."""

    def __init__(
        self,
        cfg: EvalConfig,
        teacher: TextTeacher | None,
        student: SpeechLM | None,
        extra: Mapping[str, SpeechLM],
        asr: ASRBackend | None,
    ) -> None:
        self.cfg = cfg
        self._teacher = teacher
        self._students: dict[str, SpeechLM] = dict(extra)
        if student is not None:
            self._students["student"] = student
        self._asr = asr
        self._shared_vocab: bool | None = None
        self._speech: dict[str, SpeechInputs] = {}

    @property
    def teacher(self) -> TextTeacher:
        if self._teacher is None:
            from cmkd.models.build import build_teacher

            self._teacher = build_teacher(self.cfg.teacher, trust_remote_code=self.cfg.run.trust_remote_code)
        return self._teacher

    def model(self, name: str) -> TextTeacher | SpeechLM:
        if name == TEACHER:
            return self.teacher
        if name not in self._students:
            from cmkd.models.build import build_student

            self._students[name] = build_student(
                self.cfg.student, trust_remote_code=self.cfg.run.trust_remote_code
            )
        return self._students[name]

    def shared_vocab(self, name: str) -> bool:
        """Whether teacher ŷ ids are valid targets for this model (same tokenizer); KL/NLL are skipped if not."""
        if name == TEACHER:
            return True
        from cmkd.models.vocab import same_tokenizer

        return same_tokenizer(self.teacher.tokenizer, self.model(name).tokenizer)

    def asr(self, items: Sequence[EvalItem], audio_root: Path | None) -> ASRBackend:
        """The cascade's recogniser: Whisper tiny.en in short windows (`PosteriorWhisperASR`), seeded with the
        prepare-stage posteriors of these clips when that cache was made by the same decoder (then the cascade
        reads exactly the transcripts the ASR check heard, without decoding again)."""
        if self._asr is None:
            from cmkd.data.posterior_asr import PosteriorWhisperASR

            recogniser = PosteriorWhisperASR.load(batch_size=self.cfg.eval.batch_size)
            _seed_from_cache(recogniser, items, audio_root, self.cfg.data.max_audio_seconds)
            self._asr = recogniser
        return self._asr

    def speech_inputs(self, name: str, audio_root: Path | None) -> SpeechInputs:
        """How model `name` reads clips under `audio_root`: the prepare-stage cache if it matches, else audio."""
        if name not in self._speech:
            from cmkd.data.audio import load_audio

            model = self.model(name)
            self._speech[name] = SpeechInputs.open(audio_root, model, load_audio, f"eval {name}")
        return self._speech[name]


def _seed_from_cache(
    recogniser: PosteriorWhisperASR, items: Sequence[EvalItem], audio_root: Path | None, max_seconds: float
) -> None:
    from cmkd.data.audio import load_audio
    from cmkd.data.features import posterior_meta
    from cmkd.data.speech_inputs import matching_cache
    from cmkd.models.posterior import PosteriorFeatures

    own = posterior_meta(recogniser.encoder, recogniser.decoder, recogniser.source)
    cache, why_not = matching_cache(audio_root, own)
    if cache is None:
        logger.info("cascade: decoding the clips (%s)", why_not)
        return
    seeded, top_k = 0, recogniser.decoder.top_k
    for item in items:
        for voice, clip in item.clips().items():
            if clip.audio in cache:
                try:
                    audio = load_audio(item.clip_path(voice), max_seconds=max_seconds)
                except UserError:
                    continue  # the mode itself records the unreadable clip
                recogniser.remember(audio, PosteriorFeatures.from_packed(cache.get(clip.audio), top_k))
                seeded += 1
    logger.info("cascade: %d clips' transcripts from the prepare-stage posterior cache", seeded)


def _check_extra_names(extra: Mapping[str, SpeechLM]) -> None:
    for name in extra:
        if name in _RESERVED_NAMES or not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(
                f"extra student '{name}': names are letters, digits, '_' or '-', and not teacher/student/cascade"
            )


def _judge_from(cfg: EvalConfig, judge: JudgeClient | None) -> JudgeClient | None:
    if judge is not None or not cfg.eval.judge_url:
        return judge
    return OpenAICompatibleJudge(cfg.eval.judge_url, cfg.eval.judge_model)


class _JudgeCheck:
    """Whether the judge is usable, asked once and only if some subset needs it (it may be a network call)."""

    def __init__(self, judge: JudgeClient | None) -> None:
        self.judge = judge
        self._checked = False
        self._reason: str | None = None

    def __call__(self) -> str | None:
        if not self._checked:
            self._reason, self._checked = judge_skip_reason(self.judge), True
        return self._reason


def _apply_judge(suite: Suite, check: _JudgeCheck) -> JudgeClient | None:
    """Skip judge-scored subsets (with the reason) when no judge is configured or it cannot be reached."""
    needing = judge_subsets(suite.items)
    if not needing:
        return check.judge
    reason = check()
    if reason is None:
        return check.judge
    drop_subsets(suite, dict.fromkeys(needing, reason))
    if not suite.items:
        raise UserError(f"eval.suite '{suite.name}': every subset needs a judge and {reason}")
    return None


class _TeacherAnswers:
    """The teacher's text-mode answers and ŷ ids, read from its items file once it is complete."""

    def __init__(self, models: _Models) -> None:
        self.models = models
        self.rows: dict[str, dict[str, Any]] = {}

    def answer(self, item: EvalItem) -> str | None:
        row = self.rows.get(item.id)
        return None if row is None else str(row["response"])

    def response_ids(self, item: EvalItem) -> list[int] | None:
        """ŷ: the manifest's ids, else its response text tokenized, else the teacher's answer in this run."""
        record = item.record
        ids = getattr(record, "teacher_response_ids", None)
        if ids:
            return [int(token) for token in ids]
        if record.teacher_response:
            tokenizer = self.models.teacher.tokenizer
            return list(tokenizer(record.teacher_response, add_special_tokens=False)["input_ids"])
        row = self.rows.get(item.id)
        return None if row is None or row.get("response_ids") is None else list(row["response_ids"])


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _run_mode(
    mode: ModeSpec,
    units: list[WorkUnit],
    items_file: ItemsFile,
    context: BatchContext,
    batch_size: int,
    progress: Progress,
) -> list[Reject]:
    """Answer `units` batch by batch, appending each batch's rows before the next starts."""
    rejects: list[Reject] = []
    task = progress.add_task(mode.name, total=len(units))
    for start in range(0, len(units), batch_size):
        batch = units[start : start + batch_size]
        rows, batch_rejects = run_batch(context, batch)
        items_file.append(rows)
        rejects.extend(batch_rejects)
        progress.advance(task, len(batch))
    return rejects


@restores_torch_threads
def run_eval(
    cfg: EvalConfig,
    run_dir: Path,
    *,
    student: SpeechLM | None = None,
    teacher: TextTeacher | None = None,
    extra_students: Mapping[str, SpeechLM] | None = None,
    asr: ASRBackend | None = None,
    judge: JudgeClient | None = None,
    cascade: bool = True,
    mismatched_audio: bool = False,
    limit: int = 0,
    system_prompt: str | None = None,
    teacher_forced: bool = True,
    progress: bool = True,
    speech_only: Collection[str] = (),
) -> EvalResult:
    """Evaluate the student (and `extra_students`) against the teacher on `cfg.eval.suite`; resumable.

    Models not given are built from `cfg` (student from `cfg.student`, its trained weights via
    `student.init_from`). `cascade` adds ASR -> teacher text (ASR: the embedded Whisper CTranslate2 unless given);
    `mismatched_audio` adds the control where each item is heard with another item's clip. `system_prompt`
    defaults to `cfg.teacher.system_prompt` (a record's own system prompt wins); `limit` keeps the first N items
    (per VoiceBench file); `teacher_forced=False` skips the KL/NLL passes (models without `forward`, or speed);
    `speech_only` names extra students asked in speech only (controls whose text answers are the base LM's).
    """
    extra = dict(extra_students or {})
    _check_extra_names(extra)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(run_dir)
    judge_check = _JudgeCheck(_judge_from(cfg, judge))
    suite = load_suite(
        cfg.eval.suite,
        data_root=Path(cfg.data.root),
        eval_manifest=cfg.data.eval_manifest,
        voicebench_dir=cfg.eval.voicebench_dir,
        cache_root=run_dir / "cache",
        limit=limit,
        max_audio_seconds=cfg.data.max_audio_seconds,
        progress=progress,
        judge_skip_reason=judge_check,
    )
    judge = _apply_judge(suite, judge_check)
    missing = missing_clips(suite.items)
    n_clips = sum(len(item.clips()) for item in suite.items)
    if n_clips and len(missing) == n_clips:
        first = next(iter(missing.values()))
        raise UserError(f"eval.suite '{suite.name}': none of its {n_clips} audio files can be read ({first})")
    skipped = list(suite.rejects)
    skipped += [
        Reject(item_id, f"speech/{voice}", "audio missing", why) for (item_id, voice), why in missing.items()
    ]

    roots = {item.audio_root for item in suite.items}
    audio_root = roots.pop() if len(roots) == 1 else None  # the feature cache lives under the data root
    models = _Models(cfg, teacher, student, extra, asr)
    answers = _TeacherAnswers(models)
    modes = plan_modes(
        list(extra),
        cascade=cascade and n_clips > 0,
        mismatched=mismatched_audio and n_clips > 0,
        speech_only=speech_only,
    )
    items_dir = run_dir / ITEMS_DIR
    rows_by_mode: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    unusable = set(missing)
    with _progress(progress) as bar:
        for mode in modes:
            items_file = ItemsFile(items_dir / f"{mode.name}.jsonl")
            done = items_file.load()
            pending = [
                unit for unit in plan_units(mode, suite.items, unusable, cfg.run.seed) if unit.key not in done
            ]
            if pending:
                context = BatchContext(
                    mode=mode,
                    teacher=models.teacher,
                    answer_model=models.model(mode.model),
                    system_prompt=system_prompt if system_prompt is not None else cfg.teacher.system_prompt,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    max_audio_seconds=cfg.data.max_audio_seconds,
                    response_ids=answers.response_ids,
                    teacher_answer=answers.answer,
                    judge=judge,
                    asr=models.asr(suite.items, audio_root) if mode.input is InputKind.ASR else None,
                    word_error_rate=_word_error_rate() if mode.input is InputKind.ASR else None,
                    shared_vocab=models.shared_vocab(mode.model) if teacher_forced else False,
                    teacher_forced=teacher_forced,
                    speech=(
                        models.speech_inputs(mode.model, audio_root)
                        if mode.input in (InputKind.SPEECH, InputKind.MISMATCHED)
                        else None
                    ),
                )
                skipped += _run_mode(mode, pending, items_file, context, cfg.eval.batch_size, bar)
                done = items_file.load()
            rows_by_mode[mode.name] = done
            if mode.name == f"{TEACHER}.text":
                answers.rows = {item_id: row for (item_id, _), row in done.items()}
    atomic_write_text(items_dir / SKIPPED_FILE, b"".join(dumps_line(r.to_json()) for r in skipped).decode())
    scores = summarise(
        suite,
        modes,
        rows_by_mode,
        skipped,
        n_resamples=cfg.eval.bootstrap_samples,
        seed=cfg.run.seed,
        settings=_settings_record(cfg, judge, system_prompt, limit),
    )
    scores_path = run_dir / SCORES_FILE
    atomic_write_text(scores_path, _to_json(scores))
    return EvalResult(run_dir, scores_path, items_dir, scores)


def _word_error_rate() -> Any:
    from cmkd.data.asr_check import word_error_rate

    return word_error_rate


def _settings_record(
    cfg: EvalConfig, judge: JudgeClient | None, system_prompt: str | None, limit: int
) -> dict[str, Any]:
    """What produced these numbers, printed next to them in reports."""
    return {
        "suite": cfg.eval.suite,
        "teacher": cfg.teacher.model,
        "student_lm": cfg.student.lm,
        "student_checkpoint": cfg.student.init_from,
        "system_prompt": system_prompt if system_prompt is not None else cfg.teacher.system_prompt,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "bootstrap_samples": cfg.eval.bootstrap_samples,
        "seed": cfg.run.seed,
        "limit": limit,
        "judge": judge.judge_id if judge is not None else None,
        "decoding": "greedy",
    }


def _to_json(scores: dict[str, Any]) -> str:
    import json

    return json.dumps(scores, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
