"""`cmkd train CONFIG --dry-run`: plan a GPU run from a laptop, from model configs alone.

The student and teacher are built on the meta device: every parameter has its real shape and no storage, so a
7B model costs seconds and no memory, and the counts come from the same transformers classes the run will use
(not hand arithmetic that drifts from the code). Published 7B configs are built in by hub id, so the checkpoints
need not be on the laptop. Memory is then estimated per GPU for a sharding strategy; weights, gradients and
optimizer states are exact byte counts, activations and the logits buffer are labelled estimates with their
formula, because they depend on kernels (flash attention, fused losses) the dry run cannot see. The arithmetic
lives in `cmkd.models.memory_estimate`; its names are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cmkd.errors import UserError
from cmkd.models.hf_students import AUDIO_ENCODER, FIXED_TABLES, LM, PROJECTOR, VISION, part_of
from cmkd.models.memory_estimate import GIB, LMDims, MemoryEstimate, Sharding, Strategy, estimate_memory
from cmkd.stage_configs import (
    Activation,
    DType,
    LMMode,
    MixedPrecision,
    ProjectorKind,
    ProjectorSettings,
    StudentKind,
    StudentSettings,
    TeacherSource,
    TrainConfig,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GIB",
    "DryRunReport",
    "LMDims",
    "MemoryEstimate",
    "PaperSetup",
    "PartCount",
    "Sharding",
    "Strategy",
    "dry_run",
    "estimate_memory",
    "paper_setup",
    "print_dry_run",
    "resolve_config",
    "strategy_for",
]

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class PartCount:
    """Parameters of one student part (audio encoder, projector, LM, unused vision tower) and how many train."""

    part: str
    params: int
    trainable: int


@dataclass(frozen=True)
class DryRunReport:
    """Everything the dry run found: printed by `print_dry_run`, reused as numbers by the paper-scale benchmark."""

    student: str
    teacher: str
    lm_mode: LMMode
    lora_r: int | None
    parts: tuple[PartCount, ...]
    teacher_params: int
    lm_dims: LMDims
    strategy: Strategy
    memory: MemoryEstimate

    @property
    def student_params(self) -> int:
        return sum(part.params for part in self.parts)

    @property
    def trainable_params(self) -> int:
        return sum(part.trainable for part in self.parts)

    def part(self, name: str) -> PartCount:
        return next(part for part in self.parts if part.part == name)

    @property
    def fits(self) -> bool:
        """Whether the estimate leaves 10% of the GPU for the CUDA context, NCCL and allocator fragmentation."""
        return self.memory.total <= 0.9 * self.strategy.gpu_memory_gib * GIB


# ---------------------------------------------------------------------------------------------------------------
# Configs: published sizes built in by name, anything else read from a local dir
# ---------------------------------------------------------------------------------------------------------------


def qwen2_7b_config() -> PretrainedConfig:
    """Qwen2-7B-Instruct's shape (Qwen2.5-7B-Instruct has the same): 7.62B parameters, untied head."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    )  # fmt: skip


def qwen2_5_omni_7b_thinker_config() -> PretrainedConfig:
    """The Qwen2.5-Omni-7B thinker as published. transformers' defaults match its text and audio sizes, but the
    default vision tower is 3584 wide where the release's is 1280 (2.4B parameters too many), so that is set."""
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        text_config={"tie_word_embeddings": False},
        vision_config={"hidden_size": 1280, "intermediate_size": 3420, "depth": 32, "num_heads": 16,
                       "out_hidden_size": 3584},
    )  # fmt: skip


def qwen2_audio_7b_config() -> PretrainedConfig:
    """Qwen2-Audio-7B(-Instruct) as published: a 4096-wide, 32-layer Qwen LM with vocab 156032, ffn 11008."""
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(
        text_config={"model_type": "qwen2", "vocab_size": 156032, "intermediate_size": 11008,
                     "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5},
    )  # fmt: skip


def smollm2_135m_config() -> PretrainedConfig:
    """SmolLM2-135M-Instruct, the embedded default LM (same sizes as its converted checkpoint's config.json)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip


def whisper_tiny_en_config() -> PretrainedConfig:
    """Whisper tiny.en, the embedded default encoder (only its encoder half is built)."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
        encoder_ffn_dim=1536, decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536,
    )  # fmt: skip


KNOWN_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen/qwen2-7b-instruct": qwen2_7b_config,
    "qwen/qwen2.5-7b-instruct": qwen2_7b_config,
    "qwen/qwen2.5-omni-7b": qwen2_5_omni_7b_thinker_config,
    "qwen/qwen2-audio-7b": qwen2_audio_7b_config,
    "qwen/qwen2-audio-7b-instruct": qwen2_audio_7b_config,
    "smollm2": smollm2_135m_config,
    "embedded": smollm2_135m_config,
    "whisper-tiny.en": whisper_tiny_en_config,
}
"""Lower-cased names the dry run knows without any file (hub ids of the paper-scale models, embedded names)."""


def resolve_config(name: str, what: str) -> PretrainedConfig:
    """A known name, a local checkpoint dir (config.json) or a .gguf file -> its config; never touches a hub."""
    from transformers import AutoConfig

    known = KNOWN_CONFIGS.get(name.strip().lower())
    if known is not None:
        return known()
    path = Path(name).expanduser()
    if not path.exists():
        # A planned local copy not downloaded yet (checkpoints/Qwen2.5-Omni-7B): the published config of that name.
        same_name = [key for key in KNOWN_CONFIGS if key.rsplit("/", 1)[-1] == path.name.lower()]
        if same_name:
            logger.info(
                "%s: %s does not exist yet; planning with the published %s config", what, path, same_name[0]
            )
            return KNOWN_CONFIGS[same_name[0]]()
    if path.is_dir() and (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    else:
        raise UserError(
            f"{what}: '{name}' is not a local model dir with config.json, a .gguf file, or a known name "
            f"({', '.join(sorted(KNOWN_CONFIGS))}); the dry run needs the config only"
        )
    # A full Qwen2.5-Omni checkpoint holds thinker + talker + token2wav; cmkd trains the thinker alone.
    return getattr(config, "thinker_config", None) or config


# ---------------------------------------------------------------------------------------------------------------
# Meta-device models and parameter counts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _MetaStudent:
    root: nn.Module
    part_of: Callable[[str], str]
    lm_config: PretrainedConfig
    audio_config: PretrainedConfig


def _meta_student(settings: StudentSettings) -> _MetaStudent:
    """The student's modules on the meta device, and a map from parameter name to part."""
    from transformers import AutoModelForCausalLM, Qwen2_5OmniThinkerForConditionalGeneration
    from transformers import Qwen2AudioForConditionalGeneration as Qwen2Audio
    from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

    from cmkd.models.projector import build_projector

    kind = StudentKind(settings.kind)
    if kind is StudentKind.COMPOSABLE:
        lm_config, encoder_config = (
            resolve_config(settings.lm, "student.lm"),
            resolve_config(settings.encoder, "student.encoder"),
        )
        posterior = ProjectorKind(settings.projector.kind) is ProjectorKind.POSTERIOR
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(lm_config)
            lm_dim = lm.get_input_embeddings().embedding_dim
            encoder: nn.Module = WhisperEncoder(encoder_config)
            if posterior:  # the frozen Whisper decoder (+ tied output layer) decodes the posteriors
                decoder = WhisperDecoder(encoder_config)
                encoder = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
                projector = _posterior_residual(settings.projector, decoder.config.d_model, lm_dim)
            else:
                projector = build_projector(settings.projector, encoder_config.d_model, lm_dim)
        root = nn.ModuleDict({"encoder": encoder, "projector": projector, "lm": lm})
        by_prefix = {"encoder": AUDIO_ENCODER, "projector": PROJECTOR, "lm": LM}
        return _MetaStudent(
            root, lambda name: by_prefix[name.split(".", 1)[0]], lm_config.get_text_config(), encoder_config
        )
    if not settings.hf_model:
        raise UserError(f"student.hf_model: required when student.kind is {kind.value}")
    config = resolve_config(settings.hf_model, "student.hf_model")
    model_class = (
        Qwen2Audio if kind is StudentKind.QWEN2_AUDIO else Qwen2_5OmniThinkerForConditionalGeneration
    )
    expected = "qwen2_audio" if kind is StudentKind.QWEN2_AUDIO else "qwen2_5_omni_thinker"
    if config.model_type != expected:
        raise UserError(
            f"student.hf_model: holds a '{config.model_type}' model, but student.kind {kind.value} needs {expected}"
        )
    with torch.device("meta"):
        model = model_class(config)
    return _MetaStudent(
        model, lambda name: part_of(kind, name), config.get_text_config(), config.audio_config
    )


def _posterior_residual(settings: ProjectorSettings, decoder_dim: int, lm_dim: int) -> nn.Module:
    """The trainable part of `PosteriorConnector` (its bridge is a non-trainable buffer): the same layers, so the
    counts match a built connector (tested)."""
    first_out = (
        2 * settings.hidden if Activation(settings.activation) is Activation.SWIGLU else settings.hidden
    )
    return nn.ModuleDict(
        {
            "norm": nn.LayerNorm(decoder_dim),
            "linear_in": nn.Linear(decoder_dim, first_out),
            "linear_out": nn.Linear(settings.hidden, lm_dim),
        }
    )


def _lora_params(root: nn.Module, in_lm: Callable[[str], bool], rank: int, targets: list[str]) -> int:
    """Parameters peft's LoRA adds: r·(in + out) per targeted Linear (r·(rows + width) per Embedding).

    Matched as peft matches a list of names: the module's full name equals a target or ends in '.' + target."""
    total = 0
    for name, module in root.named_modules():
        if not in_lm(name + ".") or not any(
            name == target or name.endswith("." + target) for target in targets
        ):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Embedding):
            total += rank * (module.num_embeddings + module.embedding_dim)
        else:
            raise UserError(
                f"student.lora.target_modules: '{name}' is a {type(module).__name__}; LoRA targets Linear layers"
            )
    if total == 0:
        raise UserError(f"student.lora.target_modules: none of {targets} names a layer of the student's LM")
    return total


def _count_parts(student: _MetaStudent, settings: StudentSettings, lora_r: int) -> tuple[PartCount, ...]:
    """Parameters and trainable parameters per part; tied weights count once (named_parameters dedups them)."""
    params: dict[str, int] = {}
    trainable: dict[str, int] = {}
    mode = LMMode(settings.lm_mode)
    for name, param in student.root.named_parameters():
        part = student.part_of(name)
        params[part] = params.get(part, 0) + param.numel()
        trains = (
            part == PROJECTOR
            or (part == AUDIO_ENCODER and settings.encoder_trainable and not name.endswith(FIXED_TABLES))
            or (part == LM and mode is LMMode.FULL)
        )
        trainable[part] = trainable.get(part, 0) + (param.numel() if trains else 0)
    if mode is LMMode.LORA:
        in_lm = _prefix_test(student, LM)
        trainable[LM] = _lora_params(student.root, in_lm, lora_r, list(settings.lora.target_modules))
    order = (AUDIO_ENCODER, PROJECTOR, LM, VISION)
    return tuple(PartCount(part, params[part], trainable[part]) for part in order if part in params)


def _prefix_test(student: _MetaStudent, part: str) -> Callable[[str], bool]:
    """Whether a module name (with a trailing '.') lies inside `part`."""

    def inside(name: str) -> bool:
        try:
            return student.part_of(name) == part
        except (KeyError, RuntimeError):
            return False

    return inside


def _largest_unit(root: nn.Module) -> int:
    """Parameters of the biggest block ZeRO-3/FSDP gathers at once: a transformer layer or one big tensor."""
    largest = max((param.numel() for param in root.parameters()), default=0)
    for module in root.modules():
        if isinstance(module, nn.ModuleList):
            largest = max([largest, *(sum(p.numel() for p in child.parameters()) for child in module)])
    return largest


def _meta_teacher(teacher_model: str | PretrainedConfig) -> tuple[str, int, int]:
    """(name, parameters, largest gathered unit) of the teacher causal LM."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    config = (
        teacher_model
        if isinstance(teacher_model, PretrainedConfig)
        else resolve_config(teacher_model, "teacher.model")
    )
    name = teacher_model if isinstance(teacher_model, str) else f"{type(config).__name__}(in memory)"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return name, sum(param.numel() for param in model.parameters()), _largest_unit(model)


def _lm_dims(config: PretrainedConfig) -> LMDims:
    return LMDims(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size)


def dry_run(
    student: StudentSettings, teacher_model: str | PretrainedConfig, strategy: Strategy
) -> DryRunReport:
    """Count the configured student's and teacher's parameters on the meta device and estimate per-GPU memory."""
    mode = LMMode(student.lm_mode)
    lora_r = (strategy.lora_r or student.lora.r) if mode is LMMode.LORA else None
    if lora_r is not None and strategy.lora_r is not None:
        student = replace(student, lora=replace(student.lora, r=lora_r))
    meta = _meta_student(student)
    parts = _count_parts(meta, student, lora_r or 1)
    teacher_name, teacher_params, teacher_unit = _meta_teacher(teacher_model)
    audio = meta.audio_config
    encoder_dims = (
        (audio.d_model, audio.encoder_ffn_dim, audio.encoder_layers) if student.encoder_trainable else None
    )
    dims = _lm_dims(meta.lm_config)
    memory = estimate_memory(
        student_params=sum(part.params for part in parts),
        trainable_params=sum(part.trainable for part in parts),
        teacher_params=teacher_params,
        largest_unit=max(_largest_unit(meta.root), teacher_unit),
        dims=dims,
        encoder_dims=encoder_dims,
        strategy=strategy,
    )
    kind = StudentKind(student.kind)
    name = f"{student.lm} + {student.encoder}" if kind is StudentKind.COMPOSABLE else student.hf_model
    return DryRunReport(
        f"{kind.value}: {name}", teacher_name, mode, lora_r, parts, teacher_params, dims, strategy, memory
    )


# ---------------------------------------------------------------------------------------------------------------
# The paper's configuration and printing
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperSetup:
    """arXiv 2509.14930's run: Qwen2.5-Omni-7B thinker student, a 7B text teacher, λ 0.5, τ 2, lr 5e-6, 2 epochs.

    The GPU count, sharding and sequence lengths are not from the paper: they are a plausible plan to size."""

    student: StudentSettings
    teacher_model: str
    strategy: Strategy
    lm_lr: float = 5e-6
    kd_weight: float = 0.5
    temperature: float = 2.0
    epochs: float = 2.0
    text_to_text_samples: int = 22_456
    speech_to_text_samples: int = 44_753


def paper_setup(lm_mode: LMMode = LMMode.FULL, strategy: Strategy | None = None) -> PaperSetup:
    """The paper's configuration (`lm_mode` full by default, lora as the cheaper variant)."""
    student = StudentSettings(kind=StudentKind.QWEN2_5_OMNI, hf_model="Qwen/Qwen2.5-Omni-7B", lm_mode=lm_mode)
    return PaperSetup(student, "Qwen/Qwen2-7B-Instruct", strategy or Strategy())


def strategy_for(config: TrainConfig, **plan: Any) -> Strategy:
    """A `Strategy` from a train config (micro-batch, loss chunk, teacher source; fp32 when mixed precision is off)
    plus what a config does not hold (`n_gpus`, `sharding`, `seq_len`, `response_len`, `grad_checkpointing`, ...).

    With bf16/fp16 autocast the weight precision depends on the engine (DeepSpeed and FSDP mixed precision keep
    bf16 weights + fp32 masters, the `bfloat16` default; plain autocast keeps fp32 weights), so pass `precision`."""
    from_config: dict[str, Any] = {
        "micro_batch": config.train.batch_size,
        "kd_chunk_rows": config.loss.chunk_size,
        "teacher_online": config.train.teacher_source is TeacherSource.ONLINE,
    }
    if config.train.mixed_precision is MixedPrecision.NO:
        from_config["precision"] = DType.FLOAT32
    return Strategy(**{**from_config, **plan})


def _gib(count: int) -> str:
    return f"{count / GIB:,.2f}"


def print_dry_run(report: DryRunReport, console: Console | None = None) -> None:
    """Two rich tables: parameters per part (and what trains), and the per-GPU memory estimate with formulas."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    mode = report.lm_mode.value + (f" (r={report.lora_r})" if report.lora_r else "")
    params = Table(title=f"Student {report.student}, LM {mode}; teacher {report.teacher}")
    for column in ("part", "parameters", "trainable"):
        params.add_column(column, justify="left" if column == "part" else "right")
    for part in report.parts:
        params.add_row(part.part, f"{part.params:,}", f"{part.trainable:,}")
    params.add_row(
        "student total", f"{report.student_params:,}", f"{report.trainable_params:,}", style="bold"
    )
    params.add_row("teacher (frozen)", f"{report.teacher_params:,}", "0")
    console.print(params)

    strategy, memory = report.strategy, report.memory
    title = (
        f"Per-GPU memory: {strategy.n_gpus} GPU(s), {Sharding(strategy.sharding).value}, {DType(strategy.precision).value}, "
        f"B={strategy.micro_batch}, T={strategy.seq_len}, R={strategy.response_len}"
    )
    table = Table(title=title)
    table.add_column("item")
    table.add_column("GiB", justify="right")
    table.add_column("formula")
    rows: list[tuple[str, str, bool]] = [
        ("student weights", "student_weights", True),
        ("gradients (trainable)", "gradients", True),
        ("fp32 master weights (trainable)", "master_weights", True),
        ("AdamW states (trainable)", "optimizer_states", True),
        ("teacher weights (frozen)", "teacher_weights", True),
        ("ZeRO-3/FSDP all-gather buffers", "gather_buffers", True),
        ("activations, checkpointed (estimate)", "activations_checkpointed", memory.grad_checkpointing),
        ("activations, no checkpointing (estimate)", "activations_full", not memory.grad_checkpointing),
        ("logits/KD buffer, chunked (estimate)", "kd_buffer_chunked", memory.chunked_kd),
        ("logits/KD buffer, full [B,T,V] (estimate)", "kd_buffer_full", not memory.chunked_kd),
    ]
    for label, key, counted in rows:
        value: Any = getattr(memory, key)
        table.add_row(
            label if counted else f"[dim]{label}, not counted[/dim]", _gib(value), memory.formulas[key]
        )
    verdict = "fits" if report.fits else "does NOT fit"
    table.add_row(
        "total (counted rows)",
        _gib(memory.total),
        f"{verdict} in {strategy.gpu_memory_gib:g} GiB (10% kept free)",
        style="bold",
    )
    console.print(table)
    console.print(
        f"P = student parameters, B = micro-batch, T = positions, R = response positions, L/H/I/V = LM layers "
        f"{report.lm_dims.layers} / hidden {report.lm_dims.hidden} / ffn {report.lm_dims.intermediate} / vocab "
        f"{report.lm_dims.vocab}. Activations and buffers are rough estimates; CUDA context and fragmentation are "
        "not counted."
    )
