"""The local cache the embedded models live in: where it is, how an entry is written, how it is known finished.

Why this module exists: fetching (`assets_fetch`) and converting (`assets_convert`) both build cache entries and
must follow the same rules, kept here once: an entry is built in a staging dir beside its final place and renamed
in one step, carries a marker json naming the source wheel's sha256 and its files' sizes, and is built under a
lock shared across processes. `Steps` times each build step into the log (and a spinner, on request).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmkd.assets_fetch import PinnedWheel

logger = logging.getLogger(__name__)

MARKER_NAME = ".cmkd-asset.json"
# Bump when a conversion's output changes; markers written by an older cmkd then no longer match, and the
# asset is rebuilt from the (still cached) extracted wheel files instead of being trusted as is.
CONVERSION_FORMAT = 1

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_DIR = "smollm2-135m-instruct-gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
WHISPER_CT2_DIR = "whisper-tiny.en-ct2"
WHISPER_DIR = "whisper-tiny.en"
WHEELHOUSE_DIR = "wheels"


# ---------------------------------------------------------------------------------------------------------
# Cache location, markers, atomic writes, locking


def cache_dir() -> Path:
    """Where cmkd keeps its fetched and converted models: $CMKD_CACHE, else $XDG_CACHE_HOME/cmkd, else
    ~/.cache/cmkd. Empty variables count as unset, as the XDG spec asks. Resolution only: nothing is created."""
    explicit = os.environ.get("CMKD_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg:
        return Path(xdg).expanduser() / "cmkd"
    return Path.home() / ".cache" / "cmkd"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_matches(directory: Path, source_sha256: str) -> bool:
    """True when `directory` is a finished entry built from the pinned source by this conversion format.

    Checks the recorded file sizes too (cheap), so a truncated or deleted file is caught without re-hashing
    100 MB on every start; the full hash is checked once, on the wheel, when the entry is built."""
    marker = _read_marker(directory)
    if marker is None:
        return False
    if marker.get("source_sha256") != source_sha256 or marker.get("format") != CONVERSION_FORMAT:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for relative, size in files.items():
        file = directory / relative
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def write_marker(directory: Path, *, asset: str, pinned: PinnedWheel, build_seconds: float) -> None:
    """Written last inside the staging dir: its presence in the final dir means the entry is complete."""
    files = {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MARKER_NAME
    }
    marker = {
        "asset": asset,
        "source": pinned.requirement,
        "source_sha256": pinned.wheel_sha256,
        "license": pinned.license,
        "format": CONVERSION_FORMAT,
        "build_seconds": round(build_seconds, 2),
        "files": files,
    }
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a not-yet-existing path in a staging dir beside `final`; on success rename it to `final`.

    The staging dir lives in the same parent so the rename is atomic; on any exception it is removed, so a
    crash or Ctrl-C never leaves a `final` dir behind. The yielded path does not exist yet because some
    writers (save_pretrained, the Whisper converter) want to create their output dir themselves."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        built = staging / final.name
        yield built
        if not built.is_dir():
            raise RuntimeError(f"internal: nothing was written for {final.name} in {staging}")
        if final.exists():
            # Only reached when the marker did not match (stale or half-copied by hand): replace it.
            shutil.rmtree(final)
        built.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(final: Path) -> None:
    """A process killed with SIGKILL cannot clean its staging or download dirs (a 93 MB wheel may sit in one);
    the next builder does. It holds the cache lock, so no live builder can own them."""
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(".download-*")]:
        shutil.rmtree(stale, ignore_errors=True)


class _CacheLock:
    """Serialises builders across processes (flock on <cache>/.lock) and is re-entrant within one process,
    so two commands started together do not both spend 30 s converting, and nested ensure-calls don't
    deadlock. Without fcntl (Windows) only the in-process part applies; atomic renames still keep the cache
    consistent there, at the cost of possibly duplicated work."""

    def __init__(self) -> None:
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._handle: IO[str] | None = None

    @contextlib.contextmanager
    def hold(self, cache: Path) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                cache.mkdir(parents=True, exist_ok=True)
                self._handle = (cache / ".lock").open("a", encoding="utf-8")
                try:
                    import fcntl

                    fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX)
                except ImportError:
                    pass
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._handle is not None:
                    self._handle.close()  # closing releases the flock
                    self._handle = None


CACHE_LOCK = _CacheLock()


class Steps:
    """Times each build step into the log and, with `show`, a rich spinner line on stderr.

    The log line is always written because the first build takes a minute and a user who did not ask for
    progress should still find in the log where that minute went."""

    def __init__(self, show: bool) -> None:
        self._console: Any = None
        if show:
            from rich.console import Console

            self._console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        logger.info("%s ...", description)
        start = time.perf_counter()
        if self._console is None:
            yield
        else:
            with self._console.status(description):
                yield
        elapsed = time.perf_counter() - start
        logger.info("%s: done in %.1f s", description, elapsed)
        if self._console is not None:
            self._console.print(f"[green]✓[/green] {description} [dim]({elapsed:.1f} s)[/dim]")
