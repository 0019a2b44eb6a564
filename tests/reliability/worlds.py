"""The three commands the fault suite kills, each set up on the stage tests' tiny models and data, with paths
relative to the test's directory so that the resolved configs (and so the outputs) are the same in every test.

That sameness lets one uninterrupted reference run per command serve every kill point (`reference`), instead
of one per point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

import test_eval_runner as eval_tests
import test_prepare as prepare_tests
import test_train as train_tests
from cmkd.config import save_config

from .harness import Differences, compare_files, compare_weights, jsonl_lines, run_forked, strip_timing

# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------

MODELS = {"data": Path("data"), "lm": Path("lm"), "whisper": Path("whisper")}
TRAIN_STEPS = 6
TRAIN_SETTINGS = (
    f"train.steps={TRAIN_STEPS}",
    "train.save_every=2",
    "student.lm_mode=lora",
    "train.lora_lr=0.01",
)


def train_args(out: str, *extra: str) -> list[str]:
    """`cmkd train` on test_train's tiny run (online teacher, LoRA), 6 steps, a checkpoint every 2."""
    return ["train", *train_tests.overrides(MODELS, Path(out), *TRAIN_SETTINGS, *extra)]  # type: ignore[arg-type]


def train_outcome(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The final trainable weights and the metrics lines of a finished run."""
    return load_file(str(out / "student" / "trainable.safetensors")), jsonl_lines(out / "metrics.jsonl")


def compare_train(reference: Any, resumed: Any, steps: int = TRAIN_STEPS) -> Differences:
    """Weights within 1e-6; metrics: every step exactly once, the same losses within 1e-6."""
    (want_weights, want_rows), (got_weights, got_rows) = reference, resumed
    found = compare_weights(want_weights, got_weights)
    got_steps = [row["step"] for row in got_rows]
    expected = list(range(1, steps + 1))
    found.add(
        len(set(expected) ^ set(got_steps)) + len(got_steps) - len(set(got_steps)), f"steps {got_steps}"
    )
    for want, got in zip(want_rows, got_rows, strict=False):
        for key, value in strip_timing(want).items():
            other = got.get(key)
            if not isinstance(other, int | float) or not math.isclose(value, other, rel_tol=0, abs_tol=1e-6):
                found.add(1, f"metrics step {want['step']} {key}: {value} vs {other}")
                break
    return found


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------


def eval_args(out: str, *extra: str) -> list[str]:
    """`cmkd eval` of an untrained tiny student against the tiny teacher on test_eval_runner's 4 items × 2 voices:
    teacher text, student text, speech and mismatched audio, 2 items per batch (so several appends per mode)."""
    return [
        "eval",
        f"run.out_dir={out}",
        "data.root=data",
        "student.lm=lm",
        "student.encoder=whisper",
        "teacher.model=lm",
        "student.projector.stack=4",
        "student.projector.hidden=32",
        "teacher.system_prompt=Be brief.",
        "eval.cascade=false",
        "eval.mismatched_audio=true",
        "eval.batch_size=2",
        "eval.max_new_tokens=4",
        "eval.bootstrap_samples=100",
        *extra,
    ]


def eval_outcome(out: Path) -> dict[str, Any]:
    """Rows of every items file keyed by (id, voice), and scores.json, without timings; a duplicated key or a
    damaged line fails here."""
    found: dict[str, Any] = {}
    for path in sorted((out / "items").glob("*.jsonl")):
        rows = jsonl_lines(path)
        keyed = {
            (str(row.get("id", row.get("item_id"))), str(row.get("voice", row.get("field")))): row
            for row in rows
        }
        assert len(keyed) == len(rows), f"{path}: duplicated rows"
        found[path.name] = {key: strip_timing(row) for key, row in keyed.items()}
    found["scores.json"] = strip_timing(json.loads((out / "scores.json").read_text(encoding="utf-8")))
    return found


def _close(want: Any, got: Any) -> bool:
    """Equal, numbers within 1e-5: a resumed eval may batch the items after a torn line differently, which moves
    float sums in their last bits (greedy answers and all strings must still be identical)."""
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(_close(want[k], got[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(_close(a, b) for a, b in zip(want, got, strict=True))
    if isinstance(want, float | int) and isinstance(got, float | int) and not isinstance(want, bool):
        return math.isclose(want, got, rel_tol=1e-5, abs_tol=1e-5)
    return bool(want == got)


def compare_eval(reference: dict[str, Any], resumed: dict[str, Any]) -> Differences:
    found = Differences()
    for name in sorted(reference.keys() | resumed.keys()):
        want, got = reference.get(name), resumed.get(name)
        if name == "scores.json":
            if not _close(want, got):
                found.add(1, "scores.json differs")
            continue
        want, got = want or {}, got or {}
        missing = want.keys() ^ got.keys()
        found.add(len(missing), f"{name}: rows missing or extra {sorted(missing)[:4]}")
        changed = [key for key in want.keys() & got.keys() if not _close(want[key], got[key])]
        found.add(len(changed), f"{name}: rows differ {changed[:4]}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------


def write_prepare_config(root: str, name: str) -> Path:
    """test_prepare's config (command TTS with a fake voice pair, tiny teacher, top-8 cache) as a YAML file for
    `cmkd prepare`, with the teacher and the feature encoder loaded from the saved tiny models."""
    cfg = prepare_tests.make_config(Path(root), Path("questions.jsonl"), teacher_model="lm")
    cfg.features.encoder = "whisper"
    cfg.source.heldout_fraction = prepare_tests.HELDOUT_FRACTION
    return save_config(cfg, Path(name))


def use_fake_prepare_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cmkd prepare` with test_prepare's fake ASR (the teacher, TTS and encoder are real code on tiny models)
    and several work-log appends per stage."""
    import cmkd.data.prepare as prepare
    import cmkd.data.prepare_stages as stages

    texts = [question for _, question, _ in prepare_tests.QUESTIONS]

    def backends() -> Any:
        return stages.PrepareBackends(make_asr=lambda: prepare_tests.FakeASR(texts), asr_name="fake")

    monkeypatch.setattr(prepare, "PrepareBackends", backends)
    for name in ("TTS_CHUNK", "ASR_CHUNK", "FEATURES_CHUNK"):
        monkeypatch.setattr(stages, name, 4)


CACHE_MARKER = "teacher_logits/build.json"
"""The teacher cache's completion marker. Its fingerprint lists which work-log shard each cached row was read
from, and a resumed teacher stage stores the rows of a half-logged batch in a new work shard: the cache's own
shards and meta stay byte-identical, the marker does not (reported; prepare_assemble.py is not ours to change)."""


def prepare_outcome(root: Path) -> dict[str, bytes]:
    return prepare_tests.output_files(root)


def compare_prepare(reference: dict[str, bytes], resumed: dict[str, bytes]) -> Differences:
    """Every output byte for byte, except the cache marker, which must exist (the cache is complete)."""
    found = Differences()
    found.add(int(CACHE_MARKER not in resumed), f"{CACHE_MARKER}: missing, the cache is incomplete")
    skip = {CACHE_MARKER}
    other = compare_files(
        {k: v for k, v in reference.items() if k not in skip},
        {k: v for k, v in resumed.items() if k not in skip},
    )
    found.add(other.lost, "; ".join(other.notes or []))
    return found


# ---------------------------------------------------------------------------------------------------------------
# One reference run per command, shared by every test of the session
# ---------------------------------------------------------------------------------------------------------------

_REFERENCES: dict[str, Any] = {}


def reference(key: str, work: Callable[[], Any], outcome: Callable[[], Any]) -> Any:
    """The outcome of `work` run once, uninterrupted, in a forked child (cached under `key`)."""
    if key not in _REFERENCES:
        code = run_forked(work)
        assert code == 0, f"reference run {key} failed with exit code {code}"
        _REFERENCES[key] = outcome()
    return _REFERENCES[key]


def make_world(tiny_run: dict[str, Path], make_audio: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """test_train's tiny run plus test_eval_runner's held-out manifest and test_prepare's source and fake TTS,
    all in one directory that becomes the working directory."""
    root = tiny_run["root"]
    monkeypatch.chdir(root)
    eval_tests.write_demo_manifest(Path("data"), make_audio)
    prepare_tests.write_source(Path("."))
    prepare_tests.fake_tts_command(Path("."))
    use_fake_prepare_backends(monkeypatch)
    return root
