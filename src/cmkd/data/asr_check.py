"""ASR round-trip check: transcribe each synthesised clip and reject those whose words do not match the text.

Why: S→T distillation trains the student to answer the audio as the teacher answered the text, which only makes
sense if the audio says the text. TTS engines skip words, mispronounce names and read numbers their own way; an
ASR pass (Whisper tiny.en from the embedded default) catches that. Clips with word error rate above `max_wer`
are rejected with the transcript as evidence, and the transcript and WER of kept clips go into the manifest.

WER is computed on normalised text (`normalise_for_wer`): case, punctuation and the spelling of numbers are not
speech errors. "42" from the ASR and "forty-two" in the prompt are the same words. The normaliser is small and
written here because transformers' `EnglishTextNormalizer` needs the Whisper tokenizer's spelling map file; it
runs the same speller that made the prompts speakable (`cmkd.data.speakable.make_speakable`) over both sides, so
the ASR's digits are spelled the way the prompt was.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jiwer
import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cmkd.data.audio import load_audio
from cmkd.data.jsonl_io import Reject
from cmkd.data.speakable import (
    SpeakableLimits,
    decimal_to_words,
    make_speakable,
    number_to_words,
    ordinal_to_words,
    year_to_words,
)
from cmkd.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Text normalisation and WER
# ---------------------------------------------------------------------------------------------------------------

_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b")
_CURRENCY = re.compile(r"([$£€])\s?(\d[\d,]*(?:\.\d+)?)")
_CURRENCY_NAMES = {"$": "dollars", "£": "pounds", "€": "euros"}
_DECIMAL = re.compile(r"\b\d[\d,]*\.\d+\b")
_GROUPED = re.compile(r"\b\d{1,3}(?:,\d{3})+\b")
_INTEGER = re.compile(r"\b\d+\b")
_SYMBOL_WORDS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at "}
# Written forms Whisper prints for words a speaker says in full (the prompts spell these out).
_SPOKEN_FORMS = {"mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "vs": "versus", "ok": "okay"}
# The prompt speller's own bounds decide what is worth speaking; here any text must be normalised.
_NO_LIMITS = SpeakableLimits(max_chars=sys.maxsize, max_words=sys.maxsize, min_speakable_ratio=0.0,
                             max_non_latin_ratio=1.0)  # fmt: skip


def _integer_words(digits: str) -> str:
    """Plain 4-digit numbers in 1100-2099 read as years, as speakers say them ("nineteen eighty-four") and as
    the prompts' speller writes them; counts that large are usually written with a comma ("1,500")."""
    number = int(digits)
    if len(digits) == 4 and 1100 <= number <= 2099:
        return year_to_words(number)
    return number_to_words(number)


def _spell_with_own_rules(text: str) -> str:
    """Fallback for text the prompt speller refuses (a URL, a numeric date): digits still become words."""
    text = _CURRENCY.sub(lambda match: f" {match.group(2)} {_CURRENCY_NAMES[match.group(1)]} ", text)
    text = _ORDINAL.sub(lambda match: f" {ordinal_to_words(int(match.group(1)))} ", text)
    text = _DECIMAL.sub(lambda match: f" {decimal_to_words(match.group(0))} ", text)
    text = _GROUPED.sub(lambda match: f" {number_to_words(int(match.group(0).replace(',', '')))} ", text)
    text = _INTEGER.sub(lambda match: f" {_integer_words(match.group(0))} ", text)
    for symbol, words in _SYMBOL_WORDS.items():
        text = text.replace(symbol, words)
    return text


def _spell_like_prompts(text: str) -> str:
    """Spell numbers, currency, units and abbreviations exactly as `make_speakable` spelled the prompts, so an
    ASR's "$3.50" meets the prompt's "three dollars and fifty cents" as the same words."""
    spoken = make_speakable(text, _NO_LIMITS)
    return spoken.text if spoken.text is not None else _spell_with_own_rules(text)


def normalise_for_wer(text: str) -> str:
    """Lowercase words without punctuation, numbers spelled out: what WER should compare.

    "Dr. Smith paid $3.50 on the 2nd (50%)." -> "doctor smith paid three dollars and fifty cents on the second
    fifty percent"
    """
    text = _spell_like_prompts(unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'"))
    text = text.lower().replace("'", "")  # "don't" and "dont", "france's" and "frances" are the same words
    # Every other punctuation or symbol character separates words ("twenty-one" == "twenty one").
    text = "".join(" " if unicodedata.category(char)[0] in "PS" else char for char in text)
    return " ".join(_SPOKEN_FORMS.get(word, word) for word in text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of `hypothesis` against `reference`, both normalised. An empty reference scores 0.0 against an empty
    hypothesis and 1.0 otherwise (jiwer versions disagree on this case, so it is decided here)."""
    reference_norm = normalise_for_wer(reference)
    hypothesis_norm = normalise_for_wer(hypothesis)
    if not reference_norm:
        return 0.0 if not hypothesis_norm else 1.0
    if not hypothesis_norm:
        return 1.0
    return float(jiwer.wer(reference_norm, hypothesis_norm))


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus-level WER (total edits / total reference words) over normalised pairs with a non-empty reference."""
    if len(references) != len(hypotheses):
        raise UserError(f"corpus_wer: {len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [
        (normalise_for_wer(ref), normalise_for_wer(hyp))
        for ref, hyp in zip(references, hypotheses, strict=True)
    ]
    pairs = [(ref, hyp) for ref, hyp in pairs if ref]
    if not pairs:
        return 0.0
    edits = 0
    for ref, hyp in pairs:
        if not hyp:
            edits += len(ref.split())  # every reference word deleted
            continue
        alignment = jiwer.process_words(ref, hyp)
        edits += alignment.substitutions + alignment.deletions + alignment.insertions
    return edits / sum(len(ref.split()) for ref, _ in pairs)


# ---------------------------------------------------------------------------------------------------------------
# ASR backends
# ---------------------------------------------------------------------------------------------------------------


class ASRBackend(Protocol):
    """Speech recogniser over 16 kHz mono float32 clips; one transcript per clip, in order."""

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]: ...


def _whisper_attribute(name: str) -> Any:
    """`cmkd.models.whisper_ct2.<name>`, or None; imported only when an ASR is built (torch, transformers)."""
    try:
        from cmkd.models import whisper_ct2
    except ImportError as error:
        raise UserError(f"asr: cmkd.models.whisper_ct2 cannot be imported ({error})") from error
    return getattr(whisper_ct2, name, None)


def _loaded_or_per_call(
    class_name: str, function_name: str, model_dir: Path, **options: Any
) -> Callable[..., Any]:
    """A callable `(audio_16k, batch_size=...) -> list[str]`. Prefer the module's transcriber class, which loads
    the model once; its plain function reloads the model on every call (about a second per batch)."""
    transcriber_class = _whisper_attribute(class_name)
    if transcriber_class is not None:
        return transcriber_class(model_dir, **options)  # type: ignore[no-any-return]
    function = _whisper_attribute(function_name)
    if function is None:
        raise UserError(f"asr: cmkd.models.whisper_ct2 has neither {class_name} nor {function_name}()")
    return lambda audio, batch_size: function(model_dir, audio, batch_size=batch_size, **options)


class CT2WhisperASR:
    """Whisper through the CTranslate2 runtime on the shipped weights: the fast CPU path (design §3).

    ct2_dir: the CTranslate2 model directory; None uses the embedded default (`cmkd.assets.whisper_ct2_path()`).
    options: keyword arguments for the CTranslate2 transcriber (compute_type, threads).
    """

    def __init__(self, ct2_dir: str | Path | None = None, batch_size: int = 8, **options: Any) -> None:
        if ct2_dir is None:
            from cmkd.assets import whisper_ct2_path

            ct2_dir = whisper_ct2_path()
        if batch_size < 1:
            raise UserError(f"asr.batch_size: must be >= 1, got {batch_size}")
        self.ct2_dir = Path(ct2_dir)
        self.batch_size = batch_size
        self._transcribe = _loaded_or_per_call(
            "Ct2WhisperTranscriber", "transcribe_ct2", self.ct2_dir, **options
        )

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]:
        return list(self._transcribe(audio_16k, batch_size=self.batch_size))


class HFWhisperASR:
    """Whisper through transformers on the converted checkpoint: slower on CPU, but the same weights the student
    encoder uses, so it checks the conversion too. model_dir None uses `cmkd.assets.whisper_path()`."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 8) -> None:
        if model_dir is None:
            from cmkd.assets import whisper_path

            model_dir = whisper_path()
        if batch_size < 1:
            raise UserError(f"asr.batch_size: must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.batch_size = batch_size
        self._transcribe = _loaded_or_per_call("WhisperTranscriber", "transcribe", self.model_dir)

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]:
        return list(self._transcribe(audio_16k, batch_size=self.batch_size))


# ---------------------------------------------------------------------------------------------------------------
# The round-trip check
# ---------------------------------------------------------------------------------------------------------------


class ASRClip(NamedTuple):
    """One clip to check: which item and voice, the audio file, and the exact text it should say."""

    item_id: str
    voice: str
    path: str | Path
    text: str


@dataclass(frozen=True)
class ASRCheckResult:
    """The verdict on one clip. `wer` is None exactly when `error` is set (audio unreadable, ASR failed);
    such clips are rejected too, because nothing shows they say the text."""

    item_id: str
    voice: str
    transcript: str
    wer: float | None
    rejected: bool
    error: str | None = None

    def to_reject(self, max_wer: float) -> Reject:
        """The rejects-log entry for a rejected clip."""
        if self.error is not None:
            return Reject(
                self.item_id, "speech.audio", "asr check failed", f"voice {self.voice!r}: {self.error}"
            )
        return Reject(
            self.item_id,
            "speech.transcript",
            "asr wer too high",
            f"voice {self.voice!r}: wer {self.wer:.3f} > {max_wer:g}; heard {self.transcript[:200]!r}",
        )


def _failed(clip: ASRClip, error: BaseException | str) -> ASRCheckResult:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return ASRCheckResult(clip.item_id, clip.voice, "", None, True, message)


def _transcribe_batch(asr: ASRBackend, audio: list[np.ndarray]) -> list[str | BaseException]:
    """Transcripts for a batch; if the batch call fails, each clip is retried alone, so one bad clip costs
    only itself."""
    try:
        transcripts = asr.transcribe(audio)
        if len(transcripts) != len(audio):
            raise RuntimeError(f"ASR returned {len(transcripts)} transcripts for {len(audio)} clips")
        return [str(text) for text in transcripts]
    except Exception:
        if len(audio) == 1:
            raise
    outcomes: list[str | BaseException] = []
    for clip_audio in audio:
        try:
            outcomes.append(_transcribe_batch(asr, [clip_audio])[0])
        except Exception as error:
            outcomes.append(error)
    return outcomes


def round_trip_check(
    clips: Sequence[ASRClip | tuple[str, str, str | Path, str]],
    asr: ASRBackend,
    max_wer: float,
    batch_size: int = 8,
    progress: bool = True,
    max_seconds: float | None = None,
) -> list[ASRCheckResult]:
    """Transcribe every clip and compare with its text; one result per clip, in order, never raising for a clip.

    A clip is rejected when its WER exceeds `max_wer` or when it cannot be read or transcribed (`error` set).
    """
    if not math.isfinite(max_wer) or max_wer < 0:
        raise UserError(f"asr_check.max_wer: must be a finite number >= 0, got {max_wer}")
    if batch_size < 1:
        raise UserError(f"asr_check.batch_size: must be >= 1, got {batch_size}")
    checked = [ASRClip(*clip) for clip in clips]
    results: list[ASRCheckResult] = []
    columns = (TextColumn("[bold]asr check"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("eta"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("asr", total=len(checked))
        for start in range(0, len(checked), batch_size):
            batch = checked[start : start + batch_size]
            loaded: dict[int, np.ndarray] = {}
            verdicts: dict[int, ASRCheckResult] = {}
            for offset, clip in enumerate(batch):
                try:
                    loaded[offset] = load_audio(clip.path, max_seconds=max_seconds)
                except (UserError, OSError) as error:
                    verdicts[offset] = _failed(clip, error)
            if loaded:
                order = sorted(loaded)
                try:
                    outcomes = _transcribe_batch(asr, [loaded[offset] for offset in order])
                except Exception as error:  # a single-clip batch whose ASR call failed
                    outcomes = [error] * len(order)
                for offset, outcome in zip(order, outcomes, strict=True):
                    clip = batch[offset]
                    if isinstance(outcome, BaseException):
                        verdicts[offset] = _failed(clip, outcome)
                        continue
                    wer = word_error_rate(clip.text, outcome)
                    verdicts[offset] = ASRCheckResult(clip.item_id, clip.voice, outcome, wer, wer > max_wer)
            results.extend(verdicts[offset] for offset in range(len(batch)))
            bar.advance(task, len(batch))
    return results
