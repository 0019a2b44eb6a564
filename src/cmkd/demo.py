"""`cmkd demo`: the paper's story on real small models, offline, on a CPU, in one command.

1. prepare  the built-in questions → SmolLM2-135M-Instruct answers ŷ (+ top-64 log-probs) → hibari speech (the
            training voice) and espeak-ng en-us+m3 for held-out questions (a voice never heard in training)
            → Whisper tiny.en round-trip check → encoder feature cache;
2. stage A  build the "existing speech LLM" the usual way: Whisper encoder (frozen) + connector + SmolLM2 with
            LoRA, trained on the spoken questions with gold-answer cross-entropy. This is where forgetting comes
            from: LoRA on short gold answers moves the LM's text behaviour away from the teacher's;
3. stage B  the paper's method from the stage-A student: S→T + T→T, teacher CE + λ·τ²·KL (λ = 0.5, τ = 2),
            teacher rows read from the prepare-stage cache (`--ablations` adds the paper's other three presets);
4. eval     on the held-out questions, one run: teacher text, student text and speech (both voices), the
            stage-A student, an untrained connector and mismatched audio as controls, the ASR cascade;
5. report   Markdown + PNGs, and the table in the terminal.

Every stage is the library's own code path with the library's own configs (written into each run directory),
so `cmkd demo` is also the worked example of `cmkd prepare|train|eval|report`. Re-running resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cmkd.config import load_config, save_config
from cmkd.stage_configs import EvalConfig, PrepareConfig, TrainConfig

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "Answer the question in a few words."


@dataclass(frozen=True)
class DemoSizes:
    """What --quick shrinks; the code path is the same."""

    every: int  # keep every n-th built-in question (1: all 460)
    stage_a_steps: int
    stage_b_steps: int
    batch_size: int
    eval_limit: int  # 0: every held-out question


FULL = DemoSizes(every=1, stage_a_steps=60, stage_b_steps=60, batch_size=8, eval_limit=0)
QUICK = DemoSizes(every=15, stage_a_steps=5, stage_b_steps=5, batch_size=4, eval_limit=0)

CONNECTOR = ["student.projector.kind=posterior"]
"""The speech connector the demo trains: Whisper's posteriors bridged into SmolLM2's embeddings + a small residual.
Measured on the held-out questions (benchmarks/results/connectors.md): agreement with the teacher 0.37 at
initialisation against 0.00 for a stack-8 frame projector, which learns the question type but not its content
in a CPU budget. Its residual starts at zero and wants a small learning rate (train.lr below)."""

ABLATIONS = {
    "s2t_gold_ce": [
        "train.text_to_text=false",
        "loss.ce_target=gold",
        "loss.kd_weight=0",
        "train.teacher_source=online",
    ],
    "s2t_teacher_ce": ["train.text_to_text=false", "loss.kd_weight=0"],
    "s2t_teacher_ce_kd": ["train.text_to_text=false"],
}
"""The paper's other presets, each from the same stage-A start (the method itself is stage B)."""


def _prepare_config(data_root: Path, sizes: DemoSizes) -> PrepareConfig:
    return load_config(
        PrepareConfig,
        None,
        [
            f"run.out_dir={data_root}",
            "run.threads=1",  # measured: batched decoding on a shared 2-core box is ~4x faster with 1 thread
            f"data.root={data_root}",
            "source.kind=demo",
            f"source.every={sizes.every}",
            "teacher.model=smollm2",
            f"teacher.system_prompt={SYSTEM_PROMPT}",
            "teacher.max_new_tokens=24",
            "teacher.logits_top_k=64",
            "teacher.logits_temperature=2.0",
            "features.kind=posterior",  # the connector's input, decoded once by the ASR check (see CONNECTOR)
        ],
    )


def _student_overrides() -> list[str]:
    return [
        "student.lm=smollm2",
        "student.encoder=whisper-tiny.en",
        "student.lm_mode=lora",
        "student.lora.r=8",
        *CONNECTOR,
        "teacher.model=smollm2",
        f"teacher.system_prompt={SYSTEM_PROMPT}",
    ]


def _train_config(
    data_root: Path, out_dir: Path, steps: int, sizes: DemoSizes, extra: list[str]
) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [
            f"run.out_dir={out_dir}",
            f"data.root={data_root}",
            *_student_overrides(),
            f"train.steps={steps}",
            f"train.batch_size={sizes.batch_size}",
            "train.warmup_steps=5",
            "train.lr=1e-4",  # the posterior residual: larger steps swamp the bridged words (see CONNECTOR)
            "train.lora_lr=5e-4",
            "train.save_every=20",
            "train.log_every=2",
            "teacher.logits_top_k=64",
            "teacher.logits_temperature=2.0",
            *extra,
        ],
    )


STAGE_A = [
    "train.text_to_text=false",
    "loss.ce_target=gold",
    "loss.kd_weight=0",
    "train.teacher_source=online",
]
"""Stage A: the usual speech-LLM recipe, S→T with gold-answer CE and no teacher."""

STAGE_B = ["train.speech_share=0.5", "loss.ce_target=teacher", "loss.kd_weight=0.5", "loss.temperature=2.0"]
"""Stage B: the paper's method, S→T + T→T, teacher CE + 0.5·τ²·KL at τ = 2, teacher rows from the cache."""


def _eval_config(data_root: Path, out_dir: Path, student_dir: Path, sizes: DemoSizes) -> EvalConfig:
    return load_config(
        EvalConfig,
        None,
        [
            f"run.out_dir={out_dir}",
            f"data.root={data_root}",
            *_student_overrides(),
            f"student.init_from={student_dir}",
            "eval.suite=demo",
            "eval.max_new_tokens=24",
            f"eval.limit={sizes.eval_limit}",
            "eval.mismatched_audio=true",
        ],
    )


def _train(cfg: TrainConfig, console: Console) -> Path:
    from cmkd.train.loop import run_training

    save_config(cfg, cfg.run.out_dir / "config.yaml")
    result = run_training(cfg, cfg.run.out_dir)
    console.print(f"  trained {result.state.step} steps → {result.student_dir}")
    return result.student_dir


def run_demo(out_dir: Path, *, quick: bool = False, ablations: bool = False) -> int:
    from cmkd import assets
    from cmkd.data.prepare import run_prepare
    from cmkd.eval.report import build_report
    from cmkd.eval.runner import run_eval
    from cmkd.models.build import build_student

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log file gets whole table cells
    sizes = QUICK if quick else FULL
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(stage: str, since: float) -> None:
        timings[stage] = time.monotonic() - since
        console.rule(f"[bold]{stage}[/bold] done in {timings[stage] / 60:.1f} min")

    assets.ensure_embedded_assets(progress=True)
    data_root = out_dir / "data"

    console.rule("[bold]1. prepare[/bold]: questions → teacher answers → speech → ASR check → features")
    since = time.monotonic()
    prepare_cfg = _prepare_config(data_root, sizes)
    save_config(prepare_cfg, data_root / "config.yaml")
    run_prepare(prepare_cfg, data_root, features=prepare_cfg.features)
    mark("prepare", since)

    console.rule("[bold]2. stage A[/bold]: the usual speech LLM (S→T, gold-answer CE, LoRA)")
    since = time.monotonic()
    stage_a = _train(
        _train_config(data_root, out_dir / "stage_a", sizes.stage_a_steps, sizes, STAGE_A), console
    )
    mark("stage A", since)

    console.rule("[bold]3. stage B[/bold]: cross-modal distillation (S→T + T→T, teacher CE + λτ²KL)")
    since = time.monotonic()
    from_a = [f"student.init_from={stage_a}"]
    stage_b = _train(
        _train_config(data_root, out_dir / "stage_b", sizes.stage_b_steps, sizes, [*STAGE_B, *from_a]),
        console,
    )
    extra_students: dict[str, Any] = {}
    if ablations:
        for name, overrides in ABLATIONS.items():
            cfg = _train_config(
                data_root, out_dir / name, sizes.stage_b_steps, sizes, [*STAGE_B, *overrides, *from_a]
            )
            extra_students[name] = _train(cfg, console)
    mark("stage B", since)

    console.rule("[bold]4. evaluate[/bold] on the held-out questions")
    since = time.monotonic()
    eval_cfg = _eval_config(data_root, out_dir / "eval", stage_b, sizes)
    save_config(eval_cfg, eval_cfg.run.out_dir / "config.yaml")
    students = {"stage_a": _built(eval_cfg, stage_a, build_student)}
    students.update({name: _built(eval_cfg, path, build_student) for name, path in extra_students.items()})
    students["untrained"] = _built(eval_cfg, None, build_student)
    result = run_eval(
        eval_cfg,
        eval_cfg.run.out_dir,
        extra_students=students,
        mismatched_audio=True,
        limit=sizes.eval_limit,
        speech_only=["untrained"],  # an untrained connector changes nothing in text mode
    )
    mark("evaluate", since)

    console.rule("[bold]5. report[/bold]")
    report = build_report([result.run_dir], out_dir / "report", console=console)  # prints the tables too
    total = time.monotonic() - started
    console.print(
        "stage times (min): "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items())
        + f"; total {total / 60:.1f}"
    )
    console.print(f"[bold]plots:[/bold] {', '.join(str(path) for path in report.plots)}")
    return 0


def _built(eval_cfg: EvalConfig, init_from: Path | None, build_student: Any) -> Any:
    """A student for the eval's extra modes: same architecture, weights from `init_from` (None: untrained)."""
    from dataclasses import replace

    settings = replace(eval_cfg.student, init_from=str(init_from) if init_from else "")
    return build_student(settings)
