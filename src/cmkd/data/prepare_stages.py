"""The model-running stages of `cmkd prepare`: teacher ŷ (+ top-k rows), TTS, ASR round trip, encoder features.

Each stage asks the `Judge` which items are not done yet, loads its model only if there are any (a finished
re-run loads nothing), works through them in small chunks and appends each chunk's results to its work log
before starting the next. A kill therefore loses at most the chunk in flight, and the outputs of that chunk that
did reach the disk (audio files, top-k shards, feature files: each written atomically) are simply redone or
reused on the next run.

Determinism, which makes a resumed run byte-identical to an uninterrupted one: teacher batches are fixed over the
whole (shard's) item list, sorted by prompt length, and a batch with any unfinished item is regenerated whole, so
every item is always generated in the same batch company; TTS output depends only on text and voice; encoder
frames are computed one clip at a time. Posterior features come from the ASR check's batched decode (each clip in
its own masked window, so its result does not depend on its batch company beyond float rounding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cmkd.data.asr_check import ASRBackend, ASRClip, CT2WhisperASR, round_trip_check
from cmkd.data.audio import load_audio
from cmkd.data.features import (
    FEATURES_DIR,
    MADE_BY,
    FeatureMeta,
    FeatureSettings,
    encode_clip,
    feature_meta,
    posterior_meta,
    read_feature_meta,
    write_clip_features,
    write_feature_meta,
)
from cmkd.data.logit_cache import CacheMeta, LogitCacheWriter, tokenizer_hash
from cmkd.data.posterior_asr import PosteriorWhisperASR, posterior_asr_name
from cmkd.data.prepare_plan import ClipPlan, ClipState, Judge, asr_item_fp, teacher_item_fp, topk_dir
from cmkd.data.prepare_work import failed_row, file_sha256, ok_row, progress_bar
from cmkd.data.records import PairedRecord
from cmkd.data.teacher_targets import TeacherRequest, TeacherTarget, generate_targets
from cmkd.data.tts import TTSJob, make_backend, synthesize_many
from cmkd.errors import UserError
from cmkd.models.encoder import WhisperSpeechEncoder, load_whisper_encoder
from cmkd.stage_configs import FeatureKind, PrepareConfig, TTSVoice

# ---------------------------------------------------------------------------------------------------------------
# The models, injectable
# ---------------------------------------------------------------------------------------------------------------


def load_teacher_model(cfg: PrepareConfig) -> tuple[Any, Any]:
    """The embedded default or whatever `teacher.model` names, via the one loader cmkd uses everywhere."""
    from cmkd.models.loading import load_causal_lm
    from cmkd.models.teacher import TORCH_DTYPES

    return load_causal_lm(
        cfg.teacher.model, dtype=TORCH_DTYPES[cfg.teacher.dtype], trust_remote_code=cfg.run.trust_remote_code
    )


def make_ct2_asr() -> ASRBackend:
    """The CTranslate2 recogniser (30 s windows, int8): pass `make_asr=make_ct2_asr, asr_name=CT2_ASR_NAME`."""
    return CT2WhisperASR(batch_size=8)


CT2_ASR_NAME = "ct2-int8:whisper-tiny.en"


@dataclass
class PrepareBackends:
    """The models prepare runs, each built only when its stage has work. Tests inject tiny or fake ones.

    `make_asr` None: Whisper decoded by the posterior connector's decoder under the feature settings
    (`PosteriorWhisperASR`), whose decodes the posterior feature cache reuses. `asr_name` enters the ASR
    fingerprint: a different recogniser re-checks every clip.
    """

    load_teacher: Callable[[PrepareConfig], tuple[Any, Any]] = load_teacher_model
    make_asr: Callable[[], ASRBackend] | None = None
    asr_name: str = ""
    load_encoder: Callable[[str], WhisperSpeechEncoder] = load_whisper_encoder
    make_posterior: Callable[[FeatureSettings], PosteriorWhisperASR] = PosteriorWhisperASR.for_features

    def resolved(self, features: FeatureSettings) -> PrepareBackends:
        """These backends with the default recogniser filled in."""
        if self.make_asr is not None:
            if not self.asr_name:
                raise UserError(
                    "PrepareBackends: a custom make_asr needs an asr_name (it enters fingerprints)"
                )
            return self
        name = posterior_asr_name(features)
        return replace(self, make_asr=lambda: self.make_posterior(features), asr_name=name)


@dataclass
class StageContext:
    cfg: PrepareConfig
    root: Path
    work_dir: Path
    shard: str
    judge: Judge
    backends: PrepareBackends
    features: FeatureSettings
    teacher_fp: str  # fingerprint of the teacher settings (prepare_plan.teacher_settings_fp)
    progress: bool
    console: Console
    generated: Counter[str] = field(default_factory=Counter)  # items computed by this run, per stage
    asr: ASRBackend | None = None  # the recogniser, once the ASR stage has built it


# Items per work-log append. Smaller chunks lose less to a kill; each append costs one fsync.
TTS_CHUNK = 32
ASR_CHUNK = 32
FEATURES_CHUNK = 16


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: teacher responses and top-k rows
# ---------------------------------------------------------------------------------------------------------------


def _generate(
    model: Any, tokenizer: Any, batch: Sequence[PairedRecord], cfg: PrepareConfig
) -> dict[str, Any]:
    """id -> TeacherTarget, or the error text of an item that fails even alone (a failing batch is split up)."""
    settings = cfg.teacher
    requests = [TeacherRequest(record.id, record.prompt, record.system) for record in batch]
    try:
        targets = next(
            generate_targets(
                model, tokenizer, requests, batch_size=len(requests), max_new_tokens=settings.max_new_tokens,
                top_k=settings.logits_top_k, temperature=settings.logits_temperature,
                do_sample=settings.do_sample, sample_temperature=settings.sample_temperature, seed=cfg.run.seed,
            )
        )  # fmt: skip
        return {target.item_id: target for target in targets}
    except UserError:
        raise  # a settings problem (k larger than the vocabulary, ...): no item could succeed
    except Exception as error:
        if len(batch) == 1:
            return {batch[0].id: f"{type(error).__name__}: {error}"}
    outcomes: dict[str, Any] = {}
    for record in batch:
        outcomes.update(_generate(model, tokenizer, [record], cfg))
    return outcomes


def run_teacher(ctx: StageContext, records: Sequence[PairedRecord]) -> None:
    settings = ctx.cfg.teacher

    def done(record: PairedRecord) -> bool:
        return ctx.judge.teacher_row(record, ctx.teacher_fp, ctx.work_dir) is not None

    order = sorted(records, key=lambda record: (len(record.prompt), record.id))
    batches = [batch for batch in _chunks(order, settings.batch_size) if not all(done(r) for r in batch)]
    if not batches:
        return
    total = sum(1 for batch in batches for record in batch if not done(record))
    ctx.console.print(f"teacher: generating {total} of {len(records)} responses ({settings.model})")
    model, tokenizer = ctx.backends.load_teacher(ctx.cfg)
    writer = None
    if settings.logits_top_k > 0:
        vocab_rows = int(model.get_output_embeddings().weight.shape[0])
        meta = CacheMeta(
            settings.model,
            tokenizer_hash(tokenizer),
            vocab_rows,
            settings.logits_top_k,
            settings.logits_temperature,
        )
        writer = LogitCacheWriter(topk_dir(ctx.work_dir, ctx.shard, ctx.teacher_fp), meta)
    log = ctx.judge.logs["teacher"]
    with progress_bar(ctx.progress) as bar:
        task = bar.add_task("teacher", total=total)
        for batch in batches:
            todo = [record for record in batch if not done(record)]
            outcomes = _generate(model, tokenizer, batch, ctx.cfg)
            good = [(r, outcomes[r.id]) for r in todo if isinstance(outcomes[r.id], TeacherTarget)]
            topk_file = None
            if writer is not None and good:
                topk_file = writer.write(
                    [r.id for r, _ in good], [(t.topk.ids, t.topk.logprobs) for _, t in good]
                ).name
            rows, position = [], 0
            for record in todo:
                fp, outcome = teacher_item_fp(ctx.teacher_fp, record), outcomes[record.id]
                if isinstance(outcome, str):
                    rows.append(
                        failed_row(record.id, fp, record.id, "teacher.response", "teacher failed", outcome)
                    )
                    continue
                rows.append(
                    ok_row(
                        record.id, fp, response=outcome.response, response_ids=list(outcome.response_ids),
                        truncated=outcome.truncated, topk=topk_file, topk_row=position,
                    )
                )  # fmt: skip
                position += 1
            log.append(rows)
            ctx.generated["teacher"] += len(todo)
            bar.advance(task, len(todo))


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: TTS
# ---------------------------------------------------------------------------------------------------------------


def _check_voice(voice: TTSVoice, label: str) -> None:
    """Speak one word before the batch: an unusable backend or voice is a settings problem, reported once, not as
    a reject for every clip."""
    backend = make_backend(voice.backend, voice.command)
    try:
        backend.synthesize("Testing.", voice.voice)
    except Exception as error:
        raise UserError(f"tts voice {label}: does not work on this machine ({error})") from None


def run_tts(ctx: StageContext, plans: Sequence[ClipPlan]) -> None:
    log = ctx.judge.logs["tts"]
    todo = [
        plan
        for plan in plans
        if plan.tts_voice is not None
        and not (log.ok_row(plan.audio, plan.tts_fp) and (ctx.root / plan.audio).is_file())
    ]
    if not todo:
        return
    ctx.console.print(f"tts: {len(todo)} clips to synthesise")
    checked: set[str] = set()
    for plan in todo:
        if plan.label not in checked and plan.tts_voice is not None:
            _check_voice(plan.tts_voice, plan.label)
            checked.add(plan.label)
    workers = ctx.cfg.tts.workers
    # Chunks keep the log current; with a worker pool each chunk pays the pool start-up, so they are larger.
    chunk_size = TTS_CHUNK if workers == 1 else 200 * workers
    with progress_bar(ctx.progress) as bar:
        task = bar.add_task("tts", total=len(todo))
        for chunk in _chunks(todo, chunk_size):
            jobs = [
                TTSJob(
                    p.item_id,
                    p.text,
                    p.tts_voice.backend,
                    p.tts_voice.voice,
                    ctx.root / p.audio,
                    p.tts_voice.command,
                )
                for p in chunk
                if p.tts_voice is not None
            ]
            results = synthesize_many(jobs, workers=workers, progress=False)
            rows = []
            for plan, result in zip(chunk, results, strict=True):
                if result.error is None and result.path is not None:
                    sha = file_sha256(result.path)
                    rows.append(
                        ok_row(
                            plan.audio,
                            plan.tts_fp,
                            item_id=plan.item_id,
                            seconds=round(result.seconds, 6),
                            sha256=sha,
                        )
                    )
                    ctx.generated["tts"] += 0 if result.reused else 1
                else:
                    detail = f"voice {plan.label!r}: {result.error}"
                    rows.append(
                        failed_row(
                            plan.audio, plan.tts_fp, plan.item_id, "speech.audio", "tts failed", detail
                        )
                    )
            log.append(rows)
            bar.advance(task, len(chunk))


# ---------------------------------------------------------------------------------------------------------------
# Stage 5: ASR round trip
# ---------------------------------------------------------------------------------------------------------------


def run_asr(ctx: StageContext, plans: Sequence[ClipPlan]) -> None:
    states = [ctx.judge.clip(plan, with_features=False) for plan in plans if plan.tts_voice is not None]
    todo = [state for state in states if state.missing == "asr"]
    if not todo:
        return
    ctx.console.print(f"asr: checking {len(todo)} clips ({ctx.backends.asr_name})")
    assert ctx.backends.make_asr is not None, "run_prepare resolves the default recogniser"
    asr = ctx.asr = ctx.backends.make_asr()
    log = ctx.judge.logs["asr"]
    with progress_bar(ctx.progress) as bar:
        task = bar.add_task("asr check", total=len(todo))
        for chunk in _chunks(todo, ASR_CHUNK):
            clips = [
                ASRClip(s.plan.item_id, s.plan.label, ctx.root / s.plan.audio, s.plan.text) for s in chunk
            ]
            results = round_trip_check(
                clips, asr, max_wer=ctx.cfg.tts.max_wer, batch_size=8, progress=False,
                max_seconds=ctx.cfg.data.max_audio_seconds,
            )  # fmt: skip
            rows = []
            for state, result in zip(chunk, results, strict=True):
                key, fp = (
                    state.plan.audio,
                    asr_item_fp(ctx.backends.asr_name, state.audio_sha256, state.plan.text),
                )
                if result.error is None and result.wer is not None:
                    rows.append(
                        ok_row(
                            key, fp, item_id=state.plan.item_id, transcript=result.transcript, wer=result.wer
                        )
                    )
                else:
                    detail = f"voice {state.plan.label!r}: {result.error}"
                    rows.append(
                        failed_row(key, fp, state.plan.item_id, "speech.audio", "asr check failed", detail)
                    )
            log.append(rows)
            ctx.generated["asr"] += len(chunk)
            bar.advance(task, len(chunk))


# ---------------------------------------------------------------------------------------------------------------
# Stage 6: frozen-encoder features
# ---------------------------------------------------------------------------------------------------------------


def _features_todo(ctx: StageContext, plans: Sequence[ClipPlan]) -> list[ClipState]:
    return [
        state for plan in plans if (state := ctx.judge.clip(plan, with_features=True)).missing == "features"
    ]


def _feature_maker(
    ctx: StageContext,
) -> tuple[FeatureMeta, Callable[[list[np.ndarray]], list[torch.Tensor]]]:
    """The cache's meta and a batch function clips -> per-clip tensors, for the configured kind."""
    settings = ctx.features
    if settings.kind is FeatureKind.POSTERIOR:
        recogniser = ctx.asr
        wanted = posterior_asr_name(settings)
        if not (isinstance(recogniser, PosteriorWhisperASR) and recogniser.name == wanted):
            recogniser = ctx.backends.make_posterior(settings)
        meta = posterior_meta(recogniser.encoder, recogniser.decoder, settings.encoder)
        return meta, lambda clips: [features.packed() for features in recogniser.features(clips)]  # N, 2k + D
    encoder = ctx.backends.load_encoder(settings.encoder)
    return feature_meta(encoder, settings), lambda clips: [encode_clip(encoder, audio) for audio in clips]


def run_features(ctx: StageContext, plans: Sequence[ClipPlan]) -> None:
    if not ctx.features.enabled:
        return
    todo = _features_todo(ctx, plans)
    if not todo:
        return
    ctx.console.print(f"features: {ctx.features.kind.value} for {len(todo)} clips ({ctx.features.encoder})")
    meta, compute = _feature_maker(ctx)
    existing = read_feature_meta(ctx.root)
    if existing is not None and existing.first_difference(meta, MADE_BY) is not None:
        if not ctx.cfg.run.overwrite:
            raise UserError(
                f"{ctx.root / FEATURES_DIR}: made by encoder {existing.encoder!r} ({existing.kind}, "
                f"{existing.weights_hash}, {existing.dtype}), this run makes {meta.encoder!r} ({meta.kind}, "
                f"{meta.weights_hash}, {meta.dtype}); pass --overwrite (run.overwrite=true) to rebuild it"
            )
        import shutil

        shutil.rmtree(ctx.root / FEATURES_DIR)
        todo = _features_todo(ctx, plans)
    write_feature_meta(ctx.root, meta)
    log = ctx.judge.logs["features"]
    with progress_bar(ctx.progress) as bar:
        task = bar.add_task("features", total=len(todo))
        for chunk in _chunks(todo, FEATURES_CHUNK):
            rows: dict[int, dict[str, Any]] = {}
            loaded: dict[int, np.ndarray] = {}
            for position, state in enumerate(chunk):
                try:
                    loaded[position] = load_audio(
                        ctx.root / state.plan.audio, max_seconds=ctx.cfg.data.max_audio_seconds
                    )
                except (
                    UserError
                ) as error:  # this clip's audio is unusable (unreadable, too short or too long)
                    rows[position] = failed_row(
                        state.plan.audio, state.features_fp, state.plan.item_id, "speech.audio",
                        "feature extraction failed", str(error),
                    )  # fmt: skip
            order = sorted(loaded)
            for position, tensor in zip(order, compute([loaded[p] for p in order]), strict=True):
                state = chunk[position]
                write_clip_features(ctx.root, state.plan.audio, tensor, ctx.features.dtype)
                rows[position] = ok_row(
                    state.plan.audio,
                    state.features_fp,
                    item_id=state.plan.item_id,
                    frames=int(tensor.shape[0]),
                )
            log.append([rows[position] for position in range(len(chunk))])
            ctx.generated["features"] += len(chunk)
            bar.advance(task, len(chunk))
    if isinstance(ctx.asr, PosteriorWhisperASR):
        ctx.asr.forget()
