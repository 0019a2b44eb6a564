"""Where a student's speech input comes from: the prepare-stage feature cache when it was made for this student's
frozen speech front end, else the audio itself (encoded or decoded online).

Why: `cmkd prepare` already runs Whisper over every kept clip (the ASR check decodes it; the features stage keeps
the result). Training and evaluation would otherwise redo that for every clip, every run and every student; with
the posterior connector that is one greedy Whisper decode per clip (~0.3 s on one CPU thread). The cache is used
only when it provably matches: the same weights (a hash of the encoder, and of the decoder for posteriors), the
same kind (frames or posteriors) and the same decode settings; otherwise the run says why and reads audio, so a
stale cache can cost time but never change a result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmkd.data.features import (
    FEATURES_DIR,
    READ_BY,
    FeatureCache,
    FeatureMeta,
    encoder_weights_hash,
    posterior_meta,
    read_feature_meta,
)
from cmkd.models.speech_lm import Prompt
from cmkd.stage_configs import FeatureKind

logger = logging.getLogger(__name__)


def student_feature_meta(student: Any) -> tuple[FeatureMeta | None, str]:
    """The cache meta `student` could read, or None and the reason it reads audio instead."""
    from cmkd.models.composable import ComposableSpeechLM
    from cmkd.models.posterior_connector import PosteriorConnector

    if not isinstance(student, ComposableSpeechLM):
        return None, f"{type(student).__name__} encodes its own audio"
    if student.settings.encoder_trainable:
        return None, "the speech encoder trains, so cached features would be stale"
    name = student.settings.encoder
    if isinstance(student.projector, PosteriorConnector):
        return posterior_meta(student.encoder, student.projector.decoder, name), ""
    encoder = student.encoder
    meta = FeatureMeta(name, encoder_weights_hash(encoder), encoder.hidden_size, "float32")
    return meta, ""


class SpeechInputs:
    """Clip -> the `Prompt` a student reads: cached features when the cache matches the student, else audio.

    `load_audio` reads one clip (path -> 16 kHz float32); clips are kept in memory after the first read, as are
    cached features: a few hundred short questions fit many times over.
    """

    def __init__(self, cache: FeatureCache | None, load_audio: Callable[[Path], np.ndarray]) -> None:
        self.cache = cache
        self._load_audio = load_audio
        self._audio: dict[Path, np.ndarray] = {}
        self.read_from_cache = 0
        self.read_from_audio = 0

    @classmethod
    def open(
        cls, data_root: Path | None, student: Any, load_audio: Callable[[Path], np.ndarray], what: str
    ) -> SpeechInputs:
        """Use the cache under `data_root` if it matches `student`; log which input `what` (a run) reads."""
        cache, reason = _matching_cache(data_root, student)
        if cache is None:
            logger.info("%s: speech inputs from audio (%s)", what, reason)
        else:
            logger.info(
                "%s: speech inputs from the %s cache in %s", what, cache.meta.kind, cache.root / FEATURES_DIR
            )
        return cls(cache, load_audio)

    def prompt(
        self, system: str | None, path: Path, key: str | None, audio: np.ndarray | None = None
    ) -> Prompt:
        """The speech prompt for clip `path` (`key`: its manifest path relative to the data root, or None;
        `audio`: the clip if the caller has already read it)."""
        if self.cache is not None and key is not None and key in self.cache:
            self.read_from_cache += 1
            return Prompt(system=system, features=self.cache.get(key))
        self.read_from_audio += 1
        if audio is not None:
            return Prompt(system=system, audio=audio)
        if path not in self._audio:
            self._audio[path] = self._load_audio(path)
        return Prompt(system=system, audio=self._audio[path])


def _matching_cache(data_root: Path | None, student: Any) -> tuple[FeatureCache | None, str]:
    expected, reason = student_feature_meta(student)
    if expected is None:
        return None, reason
    return matching_cache(data_root, expected)


def matching_cache(data_root: Path | None, expected: FeatureMeta) -> tuple[FeatureCache | None, str]:
    """The cache under `data_root` if a reader expecting `expected` may use it, else None and why not."""
    if data_root is None:
        return None, "no data root"
    meta = read_feature_meta(data_root)
    if meta is None:
        return None, f"no feature cache in {Path(data_root) / FEATURES_DIR}"
    name = meta.first_difference(expected, READ_BY)
    if name is not None:
        have, want = getattr(meta, name), getattr(expected, name)
        return (
            None,
            f"the {FeatureKind(meta.kind).value} cache's {name} is {have!r}, this reader needs {want!r}",
        )
    return FeatureCache(data_root), ""
