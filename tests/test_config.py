"""The config system: one merge order, clear one-line errors, nothing silently fixed."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cmkd.cli import main
from cmkd.config import StrEnum, describe, load_config, param, parse_override, save_config, to_dict
from cmkd.errors import UserError
from cmkd.stage_configs import Divergence, LMMode, TrainConfig, parse_shard


class Color(StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    rate: float = param(0.5, "A rate.", ge=0, le=1)
    names: list[str] = param(["a"], "Some names.")


@dataclass
class Outer:
    inner: Inner = param(factory=Inner, doc="Inner section.")
    color: Color = param(Color.RED, "A colour.")
    count: int = param(3, "A count.", gt=0)
    label: str | None = param(None, "Optional label.")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_order_defaults_yaml_overrides(tmp_path: Path) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", {"inner": {"rate": 0.25}, "count": 7})
    assert load_config(Outer).inner.rate == 0.5  # defaults
    from_yaml = load_config(Outer, cfg_file)
    assert (from_yaml.inner.rate, from_yaml.count) == (0.25, 7)  # YAML over defaults
    overridden = load_config(Outer, cfg_file, ["inner.rate=0.75", "color=blue", "label=x"])
    assert overridden.inner.rate == 0.75  # CLI over YAML
    assert overridden.count == 7  # YAML kept where not overridden
    assert overridden.color is Color.BLUE
    assert overridden.label == "x"


def test_defaults_are_not_shared_between_instances() -> None:
    first, second = load_config(Outer), load_config(Outer)
    first.inner.names.append("b")
    assert second.inner.names == ["a"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.rat=0.1"], "config key 'inner.rat': unknown key (did you mean 'inner.rate'?)"),
        (["count=abc"], "count: expected an integer, got 'abc'"),
        (["count=1.5"], "count: expected an integer, got 1.5"),
        (["count=0"], "count: 0 is out of range; it must be > 0"),
        (["inner.rate=2"], "inner.rate: 2.0 is out of range; it must be <= 1"),
        (["color=green"], "color: 'green' is not one of red, blue"),
        (["inner=3"], "inner: expected a section (mapping), got 3"),
        (["inner.names=x"], "inner.names: expected a list, got 'x'"),
        (["count"], "override 'count': expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(Outer, None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", {"count": 2})
    with pytest.raises(UserError, match="override 'count.deeper': 'count' is a value, not a section"):
        load_config(Outer, cfg_file, ["count.deeper=1"])


def test_bool_is_not_an_int_and_int_is_a_float() -> None:
    with pytest.raises(UserError, match="count: expected an integer, got True"):
        load_config(Outer, None, ["count=true"])
    assert load_config(Outer, None, ["inner.rate=1"]).inner.rate == 1.0


def test_scientific_notation_override_is_a_number() -> None:
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert load_config(TrainConfig, None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(Outer, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Outer, bad)
    top_list = write_yaml(tmp_path / "list.yaml", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(Outer, top_list)


def test_cross_field_validation_in_stage_configs() -> None:
    with pytest.raises(UserError, match="train: text_to_text and speech_to_text are both false"):
        load_config(TrainConfig, None, ["train.text_to_text=false", "train.speech_to_text=false"])
    with pytest.raises(UserError, match="loss.temperature: 3.0 differs from teacher.logits_temperature"):
        load_config(TrainConfig, None, ["loss.temperature=3"])
    with pytest.raises(UserError, match="loss.temperature: -1.0 is out of range"):
        load_config(TrainConfig, None, ["loss.temperature=-1", "train.teacher_source=online"])
    with pytest.raises(UserError, match="shard"):
        parse_shard("3/2")
    assert parse_shard("1/4") == (1, 4)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, None, ["loss.divergence=jsd", "student.lm_mode=lora", "train.steps=5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(TrainConfig, path)
    assert again == cfg
    assert again.loss.divergence is Divergence.JSD and again.student.lm_mode is LMMode.LORA
    assert to_dict(again)["loss"]["divergence"] == "jsd"


def test_describe_lists_every_leaf_with_docs() -> None:
    rows = {row.key: row for row in describe(TrainConfig)}
    assert "loss.temperature" in rows and "train.lr" in rows and "student.projector.stack" in rows
    assert "τ" in rows["loss.temperature"].doc and "> 0" in rows["loss.temperature"].doc
    assert all(row.doc for row in rows.values()), [k for k, r in rows.items() if not r.doc]


# ---------------------------------------------------------------------------------------------------------------
# CLI: exit code 2 and one line for user errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["config", "train", "train.bogus=1"], "config key 'train.bogus': unknown key"),
        (["config", "train", "train.steps=many"], "train.steps: expected an integer"),
        (["config", "train", "missing.yaml"], "config file 'missing.yaml': not found"),
        (["config", "train", "loss.temperature=-2", "train.teacher_source=online"], "loss.temperature: -2.0"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1


def test_cli_help_lists_fields_with_docs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cmkd.cli", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "loss.temperature (float, default 2.0)" in result.stdout
    assert "softening temperature" in result.stdout


def test_run_dir_refuses_a_different_config_without_overwrite(tmp_path: Path) -> None:
    from cmkd.cli import prepare_run_dir, resolve_stage_config

    out = f"run.out_dir={tmp_path / 'run'}"
    first = resolve_stage_config("train", [out, "train.steps=5"])
    prepare_run_dir(first)
    assert (tmp_path / "run" / "config.yaml").is_file()
    prepare_run_dir(resolve_stage_config("train", [out, "train.steps=5"]))  # same config: resume is fine
    with pytest.raises(UserError, match="holds a run with a different config"):
        prepare_run_dir(resolve_stage_config("train", [out, "train.steps=6"]))
    prepare_run_dir(resolve_stage_config("train", [out, "train.steps=6"], overwrite=True))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"] == 6


def test_cli_assets_status_lists_every_embedded_asset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "--status-only"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2", "whisper"):
        assert name in out


def test_entry_points_give_back_the_callers_torch_threads() -> None:
    import torch

    from cmkd.torch_threads import restores_torch_threads

    @restores_torch_threads
    def stage() -> None:
        torch.set_num_threads(1)
        raise RuntimeError("a stage that fails")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError):
            stage()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
