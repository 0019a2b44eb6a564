"""Whisper ASR by the posterior connector's own decoder: the default recogniser of the ASR check and the cascade.

Why this and not CTranslate2: CTranslate2 only decodes 30 s windows, so a 2-3 s question pays for 30 s of encoder.
`WhisperPosteriorDecoder` pads each clip to its own short window (see `cmkd.models.posterior`) and falls back to
30 s only for clips Whisper does not end itself. Measured side by side on 48 held-out demo clips per voice, one
thread (`benchmarks/bench_asr.py`, results/asr.md): 3.9x (hibari) and 4.4x (espeak-ng) faster than CTranslate2
int8, corpus WER 0.016 vs 0.023 and 0.188 vs 0.162. And it decodes
exactly what the posterior connector reads: `features()` hands the same `PosteriorFeatures` to the prepare stage's
feature cache, so the ASR check and the cache share one decode per clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cmkd.data.features import decode_tag
from cmkd.errors import UserError
from cmkd.models.encoder import WhisperSpeechEncoder
from cmkd.models.posterior import (
    PosteriorFeatures,
    WhisperPosteriorDecoder,
    audio_digest,
    load_whisper_with_tokenizer,
    posterior_features,
)
from cmkd.stage_configs import FeatureSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, WhisperForConditionalGeneration

DEFAULT_TOP_K = 8
DEFAULT_MAX_TOKENS = 96
DEFAULT_WINDOW_S = 10.0
"""The posterior connector's defaults (`ProjectorSettings`): a cache made with them serves the default student."""


class PosteriorWhisperASR:
    """`ASRBackend` over 16 kHz clips; remembers each clip's posteriors (by content) for `features()`."""

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        *,
        source: str,
        top_k: int = DEFAULT_TOP_K,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        window_s: float = DEFAULT_WINDOW_S,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"asr.batch_size: must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.encoder = WhisperSpeechEncoder.from_model(model)
        self.decoder = WhisperPosteriorDecoder(
            model, tokenizer, top_k=top_k, max_tokens=max_tokens, window_s=window_s
        )
        self._decoded: dict[str, PosteriorFeatures] = {}

    @classmethod
    def load(
        cls,
        source: str = "whisper-tiny.en",
        *,
        top_k: int = DEFAULT_TOP_K,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        window_s: float = DEFAULT_WINDOW_S,
        batch_size: int = 8,
    ) -> PosteriorWhisperASR:
        """'whisper-tiny.en' (the embedded default) or a local Whisper checkpoint dir."""
        model, tokenizer = load_whisper_with_tokenizer(source)
        return cls(
            model, tokenizer, source=source, top_k=top_k, max_tokens=max_tokens, window_s=window_s,
            batch_size=batch_size,
        )  # fmt: skip

    @classmethod
    def for_features(cls, settings: FeatureSettings) -> PosteriorWhisperASR:
        """The recogniser whose posteriors a `settings` cache holds."""
        return cls.load(
            settings.encoder, top_k=settings.posterior_top_k, max_tokens=settings.posterior_max_tokens,
            window_s=settings.posterior_window_s,
        )  # fmt: skip

    @property
    def name(self) -> str:
        """What enters the ASR fingerprint: another model or decode setting re-checks every clip."""
        decoder = self.decoder
        return _name(self.source, decoder.top_k, decoder.max_tokens, decoder.window_s)

    def features(self, audio_16k: Sequence[np.ndarray]) -> list[PosteriorFeatures]:
        """Each clip's posteriors, decoding only clips not seen before (in input order)."""
        keys = [audio_digest(audio) for audio in audio_16k]
        todo = sorted({key: index for index, key in enumerate(keys) if key not in self._decoded}.values())
        if todo:
            decoded = posterior_features(
                [audio_16k[index] for index in todo], self.encoder, self.decoder, batch_size=self.batch_size
            )
            for index, features in zip(todo, decoded, strict=True):
                self._decoded[keys[index]] = features
        return [self._decoded[key] for key in keys]

    def remember(self, audio_16k: np.ndarray, features: PosteriorFeatures) -> None:
        """Take a clip's posteriors from elsewhere (the prepare-stage cache made by this same decoder)."""
        self._decoded[audio_digest(audio_16k)] = features

    def transcribe(self, audio_16k: list[np.ndarray]) -> list[str]:
        """Greedy transcripts: the top-1 token of every kept step IS the transcript (see `posterior_features`)."""
        return [
            self.tokenizer.decode(features.token_ids, skip_special_tokens=True).strip()
            for features in self.features(audio_16k)
        ]

    def forget(self) -> None:
        """Drop remembered posteriors (after the prepare stage has written them)."""
        self._decoded.clear()


def posterior_asr_name(settings: FeatureSettings) -> str:
    """The `name` of `PosteriorWhisperASR.for_features(settings)`, without loading it."""
    return _name(
        settings.encoder, settings.posterior_top_k, settings.posterior_max_tokens, settings.posterior_window_s
    )


def _name(source: str, top_k: int, max_tokens: int, window_s: float) -> str:
    return f"posterior:{source}:{decode_tag(top_k, max_tokens, window_s)}"
