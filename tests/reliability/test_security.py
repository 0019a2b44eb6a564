"""Security: safe weight formats only, no unpickling of data files, remote code off unless asked (and logged),
no network at run time, paths confined to their roots, run directories never clobbered without --overwrite.

The source audit reads cmkd's own code (AST, not grep), so a new `torch.load` without `weights_only=True`, a
`pickle` import or a hard-coded `trust_remote_code=True` fails CI where it is introduced.
"""

from __future__ import annotations

import ast
import json
import logging
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import cmkd
import test_eval_runner as eval_tests
import test_prepare as prepare_tests
from cmkd.data.prepare import run_prepare
from cmkd.data.records import read_manifest
from cmkd.stage_configs import RunSettings
from conftest import BLOCKED_CONNECTIONS

from .harness import run_cli
from .worlds import eval_args, make_world, train_args

SRC = Path(cmkd.__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------
# The source audit
# ---------------------------------------------------------------------------------------------------------------

_PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
_NOT_WEIGHTS = ("Tokenizer", "Config", "FeatureExtractor", "Processor", "GenerationConfig")
_SAFETENSORS_ALLOWED = {
    # Loads the checkpoint cmkd's own CT2 converter has just written (safe_serialization) into the asset cache.
    ("models/whisper_ct2.py", "WhisperForConditionalGeneration"),
}


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(SRC)), ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for path in sorted(SRC.rglob("*.py"))
    ]


def _name(node: ast.AST) -> str:
    """'torch.load' for `torch.load`, 'AutoModel.from_pretrained' for `AutoModel.from_pretrained`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def audit(sources: list[tuple[str, ast.Module]]) -> list[str]:
    """Every violation as 'file:line: what'. cmkd's own classes' `from_pretrained` are audited where defined."""
    own_classes = {
        node.name for _, tree in sources for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
    }
    problems = []
    for file, tree in sources:
        for node in ast.walk(tree):
            where = f"{file}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = (
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                )
                for module in modules:
                    if module and module.split(".")[0] in _PICKLING_MODULES:
                        problems.append(f"{where}: imports {module} (unpickling runs code from the file)")
            if not isinstance(node, ast.Call):
                continue
            called = _name(node.func)
            if called.endswith("torch.load") and not _keyword_is_true(node, "weights_only"):
                problems.append(f"{where}: torch.load without weights_only=True")
            if called in ("numpy.load", "np.load") and _keyword_is_true(node, "allow_pickle"):
                problems.append(f"{where}: np.load(allow_pickle=True)")
            if called.endswith(("read_pickle", "yaml.load", "yaml.unsafe_load", "yaml.full_load")):
                problems.append(f"{where}: {called} (use yaml.safe_load / a safe format)")
            if called in ("eval", "exec"):
                problems.append(f"{where}: {called}() on strings")
            if _keyword_is_true(node, "trust_remote_code"):
                problems.append(
                    f"{where}: trust_remote_code=True hard-coded (it must come from the user's flag)"
                )
            if called.endswith(".from_pretrained"):
                receiver = called.rsplit(".", 2)[-2]
                safe = _keyword_is_true(node, "use_safetensors") or any(
                    kw.arg == "gguf_file" for kw in node.keywords
                )
                weights = receiver not in own_classes and not any(part in receiver for part in _NOT_WEIGHTS)
                if weights and not safe and (file, receiver) not in _SAFETENSORS_ALLOWED:
                    problems.append(f"{where}: {called} without use_safetensors=True (a .bin is a pickle)")
    return problems


def test_source_audit_finds_no_unsafe_loading() -> None:
    assert audit(_sources()) == []


def test_the_audit_catches_what_it_looks_for() -> None:
    """A test that cannot fail proves nothing: each rule must fire on a sample of what it forbids."""
    bad = ast.parse(
        "import pickle\n"
        "import torch\n"
        "torch.load('x.pt')\n"
        "torch.load('x.pt', weights_only=False)\n"
        "AutoModelForCausalLM.from_pretrained('m', trust_remote_code=True)\n"
        "WhisperModel.from_pretrained('w')\n"
        "yaml.load(text)\n"
        "np.load('a.npy', allow_pickle=True)\n"
    )
    problems = audit([("sample.py", bad)])
    for expected in (
        "imports pickle",
        "sample.py:3: torch.load",
        "sample.py:4: torch.load",
        "trust_remote_code=True",
        "sample.py:5: AutoModelForCausalLM.from_pretrained without",
        "sample.py:6: WhisperModel.from_pretrained",
        "yaml.load",
        "allow_pickle",
    ):
        assert any(expected in problem for problem in problems), (expected, problems)
    fine = ast.parse("AutoTokenizer.from_pretrained('m')\ntorch.load('x', weights_only=True)\n")
    assert audit([("fine.py", fine)]) == []


# ---------------------------------------------------------------------------------------------------------------
# trust_remote_code
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def loader_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every AutoModelForCausalLM/AutoTokenizer.from_pretrained call (they still run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[dict[str, Any]] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_remote_code_is_off_unless_the_flag_is_given_and_the_flag_is_logged(
    tiny_run: dict[str, Path],
    make_audio: Any,
    tts_counter: Path,
    loader_calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert RunSettings().trust_remote_code is False
    make_world(tiny_run, make_audio, monkeypatch)
    shown = run_cli(["config", "train"], capsys)
    assert shown.code == 0 and "trust_remote_code: false" in shown.out

    with caplog.at_level(logging.WARNING):
        assert run_cli(train_args("flag_off", "train.steps=1"), capsys).code == 0
    assert loader_calls and all(call.get("trust_remote_code") is False for call in loader_calls)
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]

    loader_calls.clear()
    with caplog.at_level(logging.WARNING):
        assert run_cli(train_args("flag_on", "train.steps=1", "run.trust_remote_code=true"), capsys).code == 0
    assert loader_calls and all(call.get("trust_remote_code") is True for call in loader_calls)
    logged = [r.getMessage() for r in caplog.records if "trust_remote_code is on" in r.getMessage()]
    assert logged and all(message.startswith("lm: ") for message in logged), (
        logged
    )  # names the model it applies to
    model_loads = [call for call in loader_calls if "dtype" in call]
    assert model_loads and all(call.get("use_safetensors") is True for call in model_loads)


# ---------------------------------------------------------------------------------------------------------------
# No network
# ---------------------------------------------------------------------------------------------------------------


def test_the_network_guard_blocks_everything_but_loopback() -> None:
    """The autouse fixture in tests/conftest.py: every test of the suite runs with this in place."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(OSError, match="tests run offline"),
    ):
        sock.connect(("10.255.255.1", 80))
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(OSError, match="tests run offline"),
    ):
        sock.connect_ex(("8.8.8.8", 53))
    with pytest.raises(OSError, match="tests run offline"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(OSError):
        urllib.request.urlopen("https://pypi.org/simple/", timeout=1)
    with socket.socket() as server:  # loopback still works: accelerate/torchrun and the judge tests need it
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert BLOCKED_CONNECTIONS[-1] == "pypi.org:443"  # refused before any name lookup


def test_eval_with_an_unreachable_judge_runs_offline_and_says_why(
    tiny_run: dict[str, Path],
    make_audio: Any,
    tts_counter: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The only network cmkd uses is one the user configures (eval.judge_url); when it cannot be reached the
    eval still runs, offline, and records why judge-scored subsets were skipped."""
    make_world(tiny_run, make_audio, monkeypatch)
    eval_tests.write_voicebench(Path("vb"), make_audio)
    attempts = len(BLOCKED_CONNECTIONS)
    args = [
        "eval.suite=voicebench:openbookqa,commoneval",
        "eval.voicebench_dir=vb",
        "eval.judge_url=http://10.255.255.1:8000",
        "eval.judge_model=judge",
        "eval.mismatched_audio=false",
    ]
    result = run_cli(eval_args("judged", *args), capsys)
    assert result.code == 0, result.err
    scores = json.loads(Path("judged/scores.json").read_text())
    assert scores["subsets"] == ["openbookqa"]
    assert "unreachable" in scores["skipped_subsets"]["commoneval"]
    assert BLOCKED_CONNECTIONS[attempts:] == ["10.255.255.1:8000"]  # the configured endpoint, nothing else


# ---------------------------------------------------------------------------------------------------------------
# Paths and run directories
# ---------------------------------------------------------------------------------------------------------------


def test_item_ids_cannot_steer_prepare_outputs_out_of_the_data_root(
    tmp_path: Path, tts_counter: Path, tiny_lm: Any, tiny_tokenizer: Any, tiny_whisper: Any
) -> None:
    """Ids come from the user's data: '../../x' or '/etc/x' must not become a path outside `data.root`."""
    questions = [
        ("../../../escaped", "What is the capital of France?", "Paris"),
        ("/etc/cmkd-escaped", "What color is the sky?", "blue"),
        ("a/../../b", "What is two plus two?", "four"),
    ]
    root = tmp_path / "space" / "data"
    root.parent.mkdir()
    cfg = prepare_tests.make_config(root, prepare_tests.write_source(tmp_path, questions))
    backends = prepare_tests.tiny_backends(tiny_lm, tiny_tokenizer, tiny_whisper, prepare_tests.Calls())
    before = {path for path in tmp_path.rglob("*")}
    run_prepare(cfg, root, progress=False, heldout_fraction=0.0, backends=backends)
    written = (
        {path for path in tmp_path.rglob("*")} - before - {tts_counter / "tts_calls"}
    )  # the fake's counter
    assert written and all(path.resolve().is_relative_to(root.resolve()) for path in written), sorted(written)
    assert not Path("/etc/cmkd-escaped").exists()
    for item in read_manifest(root / "train.jsonl"):
        for clip in item.speech:
            assert (root / clip.audio).resolve().is_relative_to(root.resolve())


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_a_run_dir_of_another_config_is_never_clobbered_without_overwrite(
    tiny_run: dict[str, Path],
    make_audio: Any,
    tts_counter: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_world(tiny_run, make_audio, monkeypatch)
    Path("mine").mkdir()
    Path("mine/notes.txt").write_text("a user's own file\n")
    assert run_cli(train_args("mine", "train.steps=2", "train.save_every=1"), capsys).code == 0
    assert Path("mine/notes.txt").read_text() == "a user's own file\n"  # written around, never over
    before = _snapshot(Path("mine"))

    other = run_cli(train_args("mine", "train.steps=2", "train.save_every=1", "train.lr=0.5"), capsys)
    assert other.code == 2 and "run.out_dir" in other.error and "--overwrite" in other.error
    assert _snapshot(Path("mine")) == before  # not a byte changed, config.yaml included

    other_stage = run_cli(eval_args("mine"), capsys)  # an eval pointed at a training run's directory
    assert other_stage.code == 2 and "different config" in other_stage.error
    assert _snapshot(Path("mine")) == before

    again = run_cli(
        train_args("mine", "train.steps=2", "train.save_every=1"), capsys
    )  # the same config resumes
    assert again.code == 0 and _snapshot(Path("mine"))["student/trainable.safetensors"]

    forced = run_cli(
        ["train", *train_args("mine", "train.steps=2", "train.lr=0.5")[1:], "--overwrite"], capsys
    )
    assert forced.code == 0
    assert Path("mine/notes.txt").read_text() == "a user's own file\n"
