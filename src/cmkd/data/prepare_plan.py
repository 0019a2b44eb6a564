"""What `cmkd prepare` must make for each record, and how far each piece has got.

Why a separate module: the stages (which decide what is still to do) and the final assembly (which turns the work
logs into manifests) must agree exactly on which clips a record gets, on every fingerprint, and on when a clip is
kept. Both ask the functions here, so a resumed run, a sharded run and the final merge cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmkd.data.audio import TARGET_SAMPLE_RATE
from cmkd.data.features import FeatureSettings, decode_tag, feature_relpath
from cmkd.data.jsonl_io import Reject
from cmkd.data.prepare_work import WorkLog, file_sha256, fingerprint, reject_of
from cmkd.data.records import PairedRecord, SpeechClip
from cmkd.data.tts import clip_relpath
from cmkd.errors import UserError
from cmkd.stage_configs import FeatureKind, PrepareConfig, TeacherSettings, TTSVoice

VOICE_SPLITS = ("all", "train", "heldout")
TOPK_DIR_PREFIX = "teacher_topk-"

# ---------------------------------------------------------------------------------------------------------------
# Fingerprints: everything a stage's output for one item depends on
# ---------------------------------------------------------------------------------------------------------------


def teacher_settings_fp(settings: TeacherSettings, seed: int) -> str:
    """The teacher settings that change ŷ or its cached rows. `batch_size` only changes speed, so it is left out;
    the seed matters only when sampling."""
    relevant = {
        "model": settings.model,
        "max_new_tokens": settings.max_new_tokens,
        "dtype": settings.dtype.value,
        "do_sample": settings.do_sample,
        "sample_temperature": settings.sample_temperature if settings.do_sample else None,
        "top_k": settings.logits_top_k,
        "tau": settings.logits_temperature if settings.logits_top_k else None,
        "seed": seed if settings.do_sample else None,
    }
    return fingerprint("teacher", relevant)


def teacher_item_fp(settings_fp: str, record: PairedRecord) -> str:
    return fingerprint(settings_fp, record.prompt, record.system)


def tts_item_fp(voice: TTSVoice, text: str) -> str:
    return fingerprint("tts", voice.backend, voice.voice, voice.command, text, TARGET_SAMPLE_RATE)


def asr_item_fp(asr_name: str, audio_sha256: str, text: str) -> str:
    return fingerprint("asr", asr_name, audio_sha256, text)


def features_item_fp(settings: FeatureSettings, audio_sha256: str) -> str:
    if settings.kind is FeatureKind.FRAMES:
        return fingerprint("features", settings.encoder, settings.dtype.value, audio_sha256)
    decode = decode_tag(settings.posterior_top_k, settings.posterior_max_tokens, settings.posterior_window_s)
    return fingerprint("features", settings.kind.value, decode, settings.encoder, audio_sha256)


def effective_system(record: PairedRecord, settings: TeacherSettings) -> str | None:
    """The system prompt the teacher reads: the item's own (OpenOrca has one per row), else the configured one.
    It is written into the manifest's `text.system`, so the student later sees exactly the teacher's context."""
    if record.system is not None:
        return record.system
    return settings.system_prompt or None


def check_voices(voices: list[TTSVoice]) -> None:
    """Config problems with the voice list, refused before any work starts."""
    seen: dict[tuple[str, str, str], int] = {}
    for index, voice in enumerate(voices):
        if voice.split not in VOICE_SPLITS:
            raise UserError(
                f"tts.voices[{index}].split: '{voice.split}' is not one of {', '.join(VOICE_SPLITS)}"
            )
        key = (voice.backend, voice.voice, voice.command)
        if key in seen:
            raise UserError(
                f"tts.voices[{index}]: same backend/voice as tts.voices[{seen[key]}]; their clips would be one file"
            )
        seen[key] = index


# ---------------------------------------------------------------------------------------------------------------
# Clip plans
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipPlan:
    """One clip a record should end up with: synthesised by a configured voice, or shipped by the source."""

    item_id: str
    audio: str  # path relative to the data root
    source: str  # SpeechClip.source: the TTS backend, or the source's own label ("human", "google_tts")
    voice: str
    text: str
    tts_voice: TTSVoice | None = None  # None: the audio came with the source (VoiceBench)
    tts_fp: str = ""

    @property
    def label(self) -> str:
        """How stats name the voice: 'hibari:default', 'espeak:en-us+m3'."""
        return f"{self.source}:{self.voice or 'default'}"


def plan_clips(record: PairedRecord, split: str, voices: list[TTSVoice]) -> list[ClipPlan]:
    """Source clips first (kept as they are, never re-synthesised), then one per voice whose split matches."""
    if record.speech:
        return [
            ClipPlan(record.id, clip.audio, clip.source, clip.voice, record.prompt) for clip in record.speech
        ]
    plans = []
    for voice in voices:
        if voice.split in ("all", split):
            backend_name = voice.backend
            audio = "audio/" + clip_relpath(record.id, backend_name, voice.voice, record.prompt)
            plans.append(
                ClipPlan(
                    record.id,
                    audio,
                    backend_name,
                    voice.voice,
                    record.prompt,
                    voice,
                    tts_item_fp(voice, record.prompt),
                )
            )
    return plans


@dataclass
class ClipState:
    """How far one planned clip has got. Exactly one of `kept`, `reject`, `missing` describes the end state."""

    plan: ClipPlan
    seconds: float = 0.0
    audio_sha256: str = ""
    transcript: str | None = None
    wer: float | None = None
    checked: bool = False  # the ASR round trip ran on it (its WER counts in the stats)
    reject: Reject | None = None
    missing: str = ""  # the first stage that has not run for it yet
    features_fp: str = ""

    @property
    def passed_checks(self) -> bool:
        return self.reject is None and not self.missing

    def speech_clip(self) -> SpeechClip:
        return SpeechClip(
            audio=self.plan.audio,
            sr=TARGET_SAMPLE_RATE,
            source=self.plan.source,
            voice=self.plan.voice,
            transcript=self.transcript,
            wer=None if self.wer is None else round(self.wer, 6),
        )


@dataclass
class TeacherState:
    """The teacher's result for one record: its work row, and a reject when the record cannot be used (an empty
    response has a row and a reject; a failed generation only a reject)."""

    row: dict[str, Any] | None = None
    reject: Reject | None = None

    @property
    def missing(self) -> bool:
        return self.row is None and self.reject is None


def topk_dir(work_dir: Path, shard: str, settings_fp: str) -> Path:
    """Where a shard keeps the top-k rows of one teacher configuration (a new configuration, a new directory)."""
    return work_dir / shard / f"{TOPK_DIR_PREFIX}{settings_fp[:12]}"


@dataclass
class Judge:
    """Decides each clip's state from the work logs and the current settings (max WER, max length)."""

    cfg: PrepareConfig
    root: Path
    logs: dict[str, WorkLog]
    asr_name: str
    features: FeatureSettings
    _source_sha: dict[str, str] = field(default_factory=dict)

    def teacher_row(self, record: PairedRecord, settings_fp: str, work_dir: Path) -> dict[str, Any] | None:
        """The finished teacher row of a record, if there is one whose cached top-k rows are still on disk."""
        row = self.logs["teacher"].ok_row(record.id, teacher_item_fp(settings_fp, record))
        if row is None or self.cfg.teacher.logits_top_k == 0:
            return row
        if not (topk_dir(work_dir, row["shard"], settings_fp) / str(row["topk"])).is_file():
            return None  # its cached rows are gone: generate again
        return row

    def teacher(self, record: PairedRecord, settings_fp: str, work_dir: Path) -> TeacherState:
        row = self.teacher_row(record, settings_fp, work_dir)
        if row is not None:
            if not row["response_ids"]:
                detail = "the teacher ended its turn before any token"
                reject = Reject(record.id, "teacher.response", "empty teacher response", detail)
                return TeacherState(row=row, reject=reject)
            return TeacherState(row=row)
        failed = self.logs["teacher"].failed_row(record.id, teacher_item_fp(settings_fp, record))
        return TeacherState(reject=None if failed is None else reject_of(failed))

    def source_sha(self, audio: str) -> str:
        if audio not in self._source_sha:
            path = self.root / audio
            self._source_sha[audio] = file_sha256(path) if path.is_file() else "missing"
        return self._source_sha[audio]

    def clip(self, plan: ClipPlan, with_features: bool) -> ClipState:
        state = ClipState(plan)
        if plan.tts_voice is None:
            state.audio_sha256 = self.source_sha(plan.audio)
        elif not self._tts(state) or not self._asr(state):
            return state
        if with_features and self.features.enabled:
            self._features(state)
        return state

    def _tts(self, state: ClipState) -> bool:
        plan, log = state.plan, self.logs["tts"]
        row = log.ok_row(plan.audio, plan.tts_fp)
        if row is None or not (self.root / plan.audio).is_file():
            failed = log.failed_row(plan.audio, plan.tts_fp)
            if failed is not None:
                state.reject = reject_of(failed)
            else:
                state.missing = "tts"
            return False
        state.seconds, state.audio_sha256 = float(row["seconds"]), str(row["sha256"])
        if state.seconds > self.cfg.data.max_audio_seconds:
            detail = f"voice {plan.label!r}: {state.seconds:.1f} s > data.max_audio_seconds {self.cfg.data.max_audio_seconds:g}"
            state.reject = Reject(plan.item_id, "speech.audio", "audio too long", detail)
            return False
        return True

    def _asr(self, state: ClipState) -> bool:
        plan, log = state.plan, self.logs["asr"]
        fp = asr_item_fp(self.asr_name, state.audio_sha256, plan.text)
        row = log.ok_row(plan.audio, fp)
        if row is None:
            failed = log.failed_row(plan.audio, fp)
            if failed is not None:
                state.reject = reject_of(failed)
            else:
                state.missing = "asr"
            return False
        state.transcript, state.wer, state.checked = str(row["transcript"]), float(row["wer"]), True
        max_wer = self.cfg.tts.max_wer
        if state.wer > max_wer:
            detail = (
                f"voice {plan.label!r}: wer {state.wer:.3f} > {max_wer:g}; heard {state.transcript[:200]!r}"
            )
            state.reject = Reject(plan.item_id, "speech.transcript", "asr wer too high", detail)
            return False
        return True

    def _features(self, state: ClipState) -> None:
        plan, log = state.plan, self.logs["features"]
        state.features_fp = features_item_fp(self.features, state.audio_sha256)
        row = log.ok_row(plan.audio, state.features_fp)
        if row is not None and (self.root / feature_relpath(plan.audio)).is_file():
            return
        failed = log.failed_row(plan.audio, state.features_fp)
        if failed is not None:
            state.reject = reject_of(failed)
        else:
            state.missing = "features"
