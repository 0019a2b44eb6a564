"""Read, validate, resample and write audio: one code path for files and for embedded bytes.

Why this exists: every stage that touches speech (TTS output, the ASR round-trip check, the frozen-encoder feature
cache, VoiceBench parquet with audio bytes) needs the same thing: a float32 mono array at 16 kHz that is known to
be sane. A NaN sample or a 40-minute file fed to the Whisper encoder fails far downstream with a message about
tensors, so the checks happen here, once, and the error names the file (design §6: read with soundfile, decode
embedded bytes the same way).

Writes are atomic (temp file in the same directory, fsync, `os.replace`): `cmkd prepare` is resumed by re-running
it and trusts that an existing FLAC is a finished one, so a kill must never leave a half-written file under the
final name.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from cmkd.errors import UserError

TARGET_SAMPLE_RATE = 16_000  # Whisper-family encoders and the manifest format (design §6) use 16 kHz mono.

_UMASK = os.umask(0)
os.umask(_UMASK)


def _decode(source: str | BinaryIO, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode `source` to (float32 mono, native rate); UserError naming `name` for anything unusable."""
    try:
        with sf.SoundFile(source) as audio_file:
            sample_rate = int(audio_file.samplerate)
            frames = int(audio_file.frames)
            if sample_rate <= 0:
                raise UserError(f"{name}: invalid sample rate {sample_rate}")
            # Checked from the header before decoding, so an hours-long file is refused without reading it.
            if max_seconds is not None and frames / sample_rate > max_seconds:
                raise UserError(
                    f"{name}: audio is {frames / sample_rate:.1f} s long, more than the {max_seconds:g} s limit"
                )
            samples = audio_file.read(dtype="float32", always_2d=True)  # frames, channels
    except UserError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"{name}: cannot decode audio ({error})") from error
    if samples.shape[0] == 0:
        raise UserError(f"{name}: audio contains no samples")
    if not np.isfinite(samples).all():
        raise UserError(f"{name}: audio contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]  # frames
    return np.ascontiguousarray(mono, dtype=np.float32), sample_rate


def resample(audio: np.ndarray, from_sr: int, to_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 `audio` at `from_sr` -> float32 at `to_sr` (soxr high quality; a no-op when rates match)."""
    if from_sr <= 0 or to_sr <= 0:
        raise UserError(f"resample: sample rates must be positive, got {from_sr} -> {to_sr}")
    mono = np.asarray(audio, dtype=np.float32)
    if from_sr == to_sr:
        return mono
    return np.asarray(soxr.resample(mono, from_sr, to_sr, quality="HQ"), dtype=np.float32)


def _check_target(target_sr: int, name: str) -> None:
    if target_sr <= 0:
        raise UserError(f"{name}: target sample rate must be positive, got {target_sr}")


def load_audio(
    path: str | Path, target_sr: int = TARGET_SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Read an audio file as float32 mono at `target_sr`.

    Any channel count, bit depth (8-bit included) and sample rate that libsndfile reads is accepted; stereo is
    averaged and the rate converted. Raises UserError naming the file when it is missing, empty, undecodable,
    has NaN/inf samples or is longer than `max_seconds`.
    """
    _check_target(target_sr, str(path))
    file_path = Path(path)
    if not file_path.is_file():
        raise UserError(f"{file_path}: audio file not found")
    if file_path.stat().st_size == 0:
        raise UserError(f"{file_path}: audio file is empty (0 bytes)")
    audio, sample_rate = _decode(str(file_path), str(file_path), max_seconds)
    return resample(audio, sample_rate, target_sr)


def decode_audio_bytes(
    data: bytes,
    target_sr: int = TARGET_SAMPLE_RATE,
    max_seconds: float | None = None,
    name: str = "<audio bytes>",
) -> np.ndarray:
    """Decode an encoded audio file held in memory (WAV/FLAC/OGG bytes, e.g. from a parquet column).

    Same checks and output as `load_audio`; `name` (an item id and field, say) goes into the error message.
    """
    _check_target(target_sr, name)
    if not data:
        raise UserError(f"{name}: audio bytes are empty")
    audio, sample_rate = _decode(io.BytesIO(data), name, max_seconds)
    return resample(audio, sample_rate, target_sr)


def duration_seconds(path: str | Path) -> float:
    """Length of an audio file in seconds, from its header (nothing is decoded)."""
    file_path = Path(path)
    if not file_path.is_file():
        raise UserError(f"{file_path}: audio file not found")
    try:
        info = sf.info(str(file_path))
    except (sf.LibsndfileError, RuntimeError, ValueError) as error:
        raise UserError(f"{file_path}: cannot decode audio ({error})") from error
    if info.samplerate <= 0:
        raise UserError(f"{file_path}: invalid sample rate {info.samplerate}")
    return float(info.frames) / float(info.samplerate)


def write_flac(path: str | Path, audio: np.ndarray, sr: int) -> Path:
    """Write mono `audio` (float, nominal range [-1, 1]) as 16-bit FLAC at `sr`, atomically.

    The data goes to a hidden temp file in the target directory and is renamed over `path` only after a
    successful write and fsync, so `path` either does not exist or holds the complete file. Samples outside
    [-1, 1] are clipped (16-bit PCM cannot hold them); NaN/inf are refused rather than written as noise.
    """
    target = Path(path)
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise UserError(f"{target}: write_flac wants mono audio (1-D), got shape {samples.shape}")
    if samples.size == 0:
        raise UserError(f"{target}: refusing to write empty audio")
    if not np.isfinite(samples).all():
        raise UserError(f"{target}: refusing to write audio with NaN or infinite samples")
    if sr <= 0:
        raise UserError(f"{target}: sample rate must be positive, got {sr}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        with os.fdopen(fd, "wb") as handle:
            sf.write(handle, np.clip(samples, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def is_valid_audio(path: str | Path, expected_sr: int | None = None) -> bool:
    """True when `path` decodes to at least one finite sample (at `expected_sr`, when given).

    Used to decide whether a finished output can be reused on resume; it decodes the whole file because a
    truncated FLAC can have a valid header.
    """
    file_path = Path(path)
    try:
        if not file_path.is_file() or file_path.stat().st_size == 0:
            return False
        if expected_sr is not None and sf.info(str(file_path)).samplerate != expected_sr:
            return False
        _decode(str(file_path), str(file_path), None)
    except (UserError, OSError, sf.LibsndfileError, RuntimeError):
        return False
    return True
