"""`cmkd`: thin subcommands over the library. Parsing and error reporting live here; the work does not.

Exit codes: 0 success, 2 a user error (bad config, missing file, bad input, a full disk: one line on stderr), 1 a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmkd.config import describe, load_config, save_config
from cmkd.errors import UserError, disk_full
from cmkd.stage_configs import STAGES


def _field_table(cls: type) -> str:
    lines = ["config fields (set in the YAML file or as key=value overrides):", ""]
    for row in describe(cls):
        lines.append(f"  {row.key} ({row.type}, default {row.default})")
        lines.extend(textwrap.wrap(row.doc, width=100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]`: the first argument without '=' is the config file."""
    path: str | None = None
    overrides: list[str] = []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            raise UserError(
                f"argument '{arg}': only one config file may be given (overrides look like key=value)"
            )
    return path, overrides


def resolve_stage_config(stage: str, args: Sequence[str], *, overwrite: bool = False) -> Any:
    """Load a stage's config from the command line arguments and the one merge order."""
    path, overrides = _split_config_args(args)
    if overwrite:
        overrides.append("run.overwrite=true")
    return load_config(STAGES[stage], path, overrides)


_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "items", "scores.json", "work")
"""What train, eval and prepare leave in a run directory (the source files a user keeps there are not outputs)."""


def prepare_run_dir(cfg: Any) -> Path:
    """Create the run directory and write the resolved config into it.

    A directory that already holds a different resolved config is only reused with `--overwrite`, so a typo in a
    command line never clobbers another experiment; the same config resumes.
    """
    import yaml

    from cmkd.config import to_dict

    run_dir = Path(cfg.run.out_dir)
    config_path = run_dir / "config.yaml"
    if config_path.exists() and not cfg.run.overwrite:
        previous = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        current = to_dict(cfg)
        for config in (previous, current):  # what may differ between runs of one experiment
            config.get("run", {}).pop("overwrite", None)
            config.pop("shard", None)
        if previous != current:
            raise UserError(
                f"run.out_dir '{run_dir}': holds a run with a different config; pick another out_dir or pass --overwrite"
            )
    elif not config_path.exists() and not cfg.run.overwrite:
        # Without its config.yaml nothing shows what made these outputs; writing ours would claim them.
        found = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
        if found:
            raise UserError(
                f"run.out_dir '{run_dir}': holds run outputs ({', '.join(found)}) but no config.yaml; pick another "
                "out_dir or pass --overwrite"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_path)
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------------


def cmd_assets(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cmkd import assets

    if not ns.status_only:
        assets.ensure_embedded_assets(progress=True)
    table = Table(title=f"embedded assets in {assets.cache_dir()}")
    for column in ("asset", "present", "size", "path"):
        table.add_column(column)
    for status in assets.describe_assets():
        size = f"{status.size_bytes / 1e6:.1f} MB" if status.present else "-"
        table.add_row(status.name, "yes" if status.present else "no", size, str(status.path))
    Console().print(table)
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    """Print the resolved config of a stage: what would run, after defaults < YAML < overrides."""
    import yaml

    from cmkd.config import to_dict

    cfg = resolve_stage_config(ns.stage, ns.args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from cmkd.demo import run_demo

    return run_demo(Path(ns.out_dir), quick=ns.quick, ablations=ns.ablations)


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(ns: argparse.Namespace) -> int:
        args = [*ns.args, f"shard={ns.shard}"] if getattr(ns, "shard", None) else ns.args
        cfg = resolve_stage_config(stage, args, overwrite=ns.overwrite)
        if getattr(ns, "dry_run", False):
            return dry_run_train(cfg, ns)
        runner = _STAGE_RUNNERS.get(stage)
        if runner is None:
            raise UserError(f"cmkd {stage}: this stage is not implemented yet in this version of cmkd")
        run_dir = prepare_run_dir(cfg)
        return runner(cfg, run_dir, ns)

    return run


def run_train(cfg: Any, run_dir: Path, ns: argparse.Namespace) -> int:
    from cmkd.train.loop import run_training

    result = run_training(cfg, run_dir)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.state.step} steps; student saved to {result.student_dir}")
    return 0


def dry_run_train(cfg: Any, ns: argparse.Namespace) -> int:
    """Build the configured models on the meta device and print sizes and a per-GPU memory estimate."""
    from cmkd.models.dry_run import dry_run, print_dry_run, strategy_for
    from cmkd.models.memory_estimate import Sharding

    try:
        sharding = Sharding(ns.sharding)
    except ValueError:
        raise UserError(
            f"--sharding: '{ns.sharding}' is not one of {', '.join(s.value for s in Sharding)}"
        ) from None
    plan = {"n_gpus": ns.gpus, "sharding": sharding, "seq_len": ns.seq_len}
    print_dry_run(dry_run(cfg.student, cfg.teacher.model, strategy_for(cfg, **plan)))
    return 0


def run_prepare_stage(cfg: Any, run_dir: Path, ns: argparse.Namespace) -> int:
    from cmkd.data.prepare import run_prepare

    run_prepare(
        cfg,
        run_dir,
        progress=True,
        merge=ns.merge,
        features=cfg.features,
        heldout_fraction=cfg.source.heldout_fraction,
    )
    return 0


def run_eval_stage(cfg: Any, run_dir: Path, ns: argparse.Namespace) -> int:
    from cmkd.eval.report import load_run, print_scores_table
    from cmkd.eval.runner import run_eval

    result = run_eval(
        cfg,
        run_dir,
        cascade=cfg.eval.cascade,
        mismatched_audio=cfg.eval.mismatched_audio,
        limit=cfg.eval.limit,
        system_prompt=cfg.eval.system_prompt or None,
        teacher_forced=cfg.eval.teacher_forced,
    )
    print_scores_table(load_run(result.run_dir))
    print(f"per-item outputs in {result.items_dir}; scores in {result.scores_path}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from cmkd.eval.report import build_report

    result = build_report([Path(d) for d in ns.run_dirs], Path(ns.out))
    print(f"report written to {result.markdown} ({len(result.plots)} plots)")
    return 0


_STAGE_RUNNERS: dict[str, Callable[[Any, Path, argparse.Namespace], int]] = {
    "prepare": run_prepare_stage,
    "train": run_train,
    "eval": run_eval_stage,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmkd",
        description="Cross-modal knowledge distillation into speech LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    sub = parser.add_subparsers(dest="command", required=True)

    assets = sub.add_parser(
        "assets", help="Fetch, verify and convert the embedded default models into the cache."
    )
    assets.add_argument("--status-only", action="store_true", help="Only list what is cached.")
    assets.set_defaults(func=cmd_assets)

    for stage, cls in STAGES.items():
        stage_parser = sub.add_parser(
            stage,
            help=f"Run the {stage} stage.",
            description=f"cmkd {stage} [CONFIG.yaml] [key=value ...]",
            epilog=_field_table(cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        stage_parser.add_argument("args", nargs="*", help="A YAML config file and/or key=value overrides.")
        stage_parser.add_argument(
            "--overwrite", action="store_true", help="Reuse a run dir made by another config."
        )
        if stage == "prepare":
            stage_parser.add_argument("--shard", help="Process shard I/N of the items (same as shard=I/N).")
            stage_parser.add_argument(
                "--merge", action="store_true", help="Assemble the manifests of all shards."
            )
        if stage == "train":
            stage_parser.add_argument(
                "--dry-run",
                action="store_true",
                help="Build the models on the meta device; print sizes and memory.",
            )
            stage_parser.add_argument("--gpus", type=int, default=8, help="Dry run: number of GPUs.")
            stage_parser.add_argument(
                "--sharding", default="zero3", help="Dry run: ddp, fsdp, zero1, zero2 or zero3."
            )
            stage_parser.add_argument(
                "--seq-len", type=int, default=1024, help="Dry run: tokens per example."
            )
        stage_parser.set_defaults(func=_stage_command(stage))

    report = sub.add_parser(
        "report", help="Tables, plots and Markdown from one or more eval runs, side by side."
    )
    report.add_argument("run_dirs", nargs="+", help="Eval run directories (e.g. baseline and method).")
    report.add_argument("--out", default="runs/report", help="Where report.md, report.json and PNGs go.")
    report.set_defaults(func=cmd_report)

    config = sub.add_parser("config", help="Print a stage's resolved config (defaults < YAML < overrides).")
    config.add_argument("stage", choices=sorted(STAGES))
    config.add_argument("args", nargs="*", help="A YAML config file and/or key=value overrides.")
    config.set_defaults(func=cmd_config)

    demo = sub.add_parser("demo", help="Run the embedded default end to end, offline, on a CPU.")
    demo.add_argument("--out-dir", default="runs/demo", help="Where the demo writes its outputs.")
    demo.add_argument("--quick", action="store_true", help="Smaller sizes, same code path (about 5 minutes).")
    demo.add_argument("--ablations", action="store_true", help="Also train the paper's other three presets.")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(ns.func(ns) or 0)
    except UserError as err:
        print(f"cmkd: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkd: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        full = disk_full(err)
        if not full:
            raise  # a bug in cmkd: the traceback is what a report needs
        where = f" writing '{full.filename}'" if isinstance(full, OSError) and full.filename else ""
        print(
            f"cmkd: error: no space left on device{where}; what was finished is kept: free some space and "
            "re-run the same command to resume",
            file=sys.stderr,
        )
        return 2


def _one_line(message: str) -> str:
    """A message from a library (transformers, libsndfile) may span lines; the CLI promises one."""
    return " | ".join(line.strip() for line in message.splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
