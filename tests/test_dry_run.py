"""`cmkd.models.dry_run`: meta-device counts equal real models', LoRA counts equal peft's, memory scales right."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from torch import nn

from cmkd.errors import UserError
from cmkd.models.dry_run import (
    GIB,
    LMDims,
    Sharding,
    Strategy,
    dry_run,
    estimate_memory,
    paper_setup,
    print_dry_run,
    qwen2_7b_config,
    strategy_for,
)
from cmkd.models.hf_students import AUDIO_ENCODER, LM, PROJECTOR, VISION, part_of
from cmkd.stage_configs import (
    Activation,
    DType,
    LMMode,
    LoraSettings,
    ProjectorKind,
    ProjectorSettings,
    StudentKind,
    StudentSettings,
)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PretrainedConfig, WhisperForConditionalGeneration

    from cmkd.models.composable import ComposableSpeechLM

TINY_TEXT = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TINY_AUDIO = {"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
              "num_mel_bins": 80}  # fmt: skip
ONE_GPU = Strategy(n_gpus=1, sharding=Sharding.DDP, seq_len=64, response_len=16)


def tiny_qwen2_audio_config() -> PretrainedConfig:
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(audio_config={"model_type": "qwen2_audio_encoder", **TINY_AUDIO},
                            text_config={"model_type": "qwen2", **TINY_TEXT})  # fmt: skip


def tiny_omni_thinker_config() -> PretrainedConfig:
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        audio_config={**TINY_AUDIO, "output_dim": 32},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 32,
                       "fullatt_block_indexes": [0]},
        text_config={**TINY_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}},
    )  # fmt: skip


def _saved(config: PretrainedConfig, directory: Path) -> str:
    config.save_pretrained(directory)
    return str(directory)


def _counts_by_part(model: nn.Module, kind: StudentKind) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        counts[part_of(kind, name)] = counts.get(part_of(kind, name), 0) + param.numel()
    return counts


@pytest.mark.parametrize(
    ("kind", "make_config", "model_class"),
    [
        (StudentKind.QWEN2_AUDIO, tiny_qwen2_audio_config, "Qwen2AudioForConditionalGeneration"),
        (StudentKind.QWEN2_5_OMNI, tiny_omni_thinker_config, "Qwen2_5OmniThinkerForConditionalGeneration"),
    ],
)
def test_meta_counts_equal_a_real_build_of_the_same_tiny_hf_config(
    tmp_path: Path, kind: StudentKind, make_config: Callable[[], PretrainedConfig], model_class: str
) -> None:
    import transformers

    real = getattr(transformers, model_class)(make_config())
    settings = StudentSettings(kind=kind, hf_model=_saved(make_config(), tmp_path), lm_mode=LMMode.FULL)
    report = dry_run(settings, "smollm2", ONE_GPU)

    real_counts = _counts_by_part(real, kind)
    assert {part.part: part.params for part in report.parts} == real_counts
    assert report.student_params == sum(param.numel() for param in real.parameters())
    assert set(real_counts) == (
        {AUDIO_ENCODER, PROJECTOR, LM, VISION}
        if kind is StudentKind.QWEN2_5_OMNI
        else {AUDIO_ENCODER, PROJECTOR, LM}
    )
    # full LM + projector train; the encoder (frozen by default) and the unused vision tower do not
    assert report.trainable_params == real_counts[LM] + real_counts[PROJECTOR]


@pytest.mark.parametrize("lm_mode", ["frozen", "lora", "full"])
def test_composable_counts_equal_the_built_student_including_peft_lora(
    tmp_path: Path,
    lm_mode: str,
    make_student: Callable[..., ComposableSpeechLM],
    tiny_lm: LlamaForCausalLM,
    tiny_whisper: WhisperForConditionalGeneration,
) -> None:
    """The conftest student (stack-4 SwiGLU projector, peft LoRA r=4 on q/v/up) against the dry run of its configs."""
    student = make_student(lm_mode=lm_mode)
    settings = StudentSettings(
        lm=_saved(tiny_lm.config, tmp_path / "lm"),
        encoder=_saved(tiny_whisper.config, tmp_path / "whisper"),
        lm_mode=LMMode(lm_mode),
        projector=ProjectorSettings(
            kind=ProjectorKind.STACK_MLP, stack=4, hidden=64, activation=Activation.SWIGLU
        ),
        lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    report = dry_run(settings, settings.lm, ONE_GPU)

    def total(module: nn.Module, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    base_lm = student.lm.get_base_model() if lm_mode == "lora" else student.lm
    lora_in_lm = sum(p.numel() for name, p in base_lm.named_parameters() if "lora_" in name)
    assert report.part(AUDIO_ENCODER).params == total(student.encoder)
    assert report.part(PROJECTOR).params == total(student.projector)
    assert report.part(LM).params == total(base_lm) - lora_in_lm
    assert report.part(LM).trainable == total(student.lm, trainable_only=True)  # peft's own count for LoRA
    assert report.trainable_params == sum(p.numel() for _, p in student.trainable_parameters())
    assert report.lora_r == (4 if lm_mode == "lora" else None)


def test_lora_count_on_an_hf_student_equals_peft_on_its_language_model(tmp_path: Path) -> None:
    """LoRA goes on the LM only: the audio tower also has q_proj/v_proj, which a bare name list would catch."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen2AudioForConditionalGeneration

    lora = LoraSettings(r=3, target_modules=["q_proj", "v_proj", "down_proj"])
    settings = StudentSettings(kind=StudentKind.QWEN2_AUDIO, hf_model=_saved(tiny_qwen2_audio_config(), tmp_path),
                               lm_mode=LMMode.LORA, lora=lora)  # fmt: skip
    report = dry_run(settings, "smollm2", ONE_GPU)

    model = Qwen2AudioForConditionalGeneration(tiny_qwen2_audio_config())
    inject_adapter_in_model(LoraConfig(r=3, target_modules=lora.target_modules), model.model.language_model)
    peft_count = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert report.part(LM).trainable == peft_count > 0
    assert dry_run(settings, "smollm2", replace(ONE_GPU, lora_r=6)).part(LM).trainable == 2 * peft_count


def _qwen2_decoder_params(config: PretrainedConfig, untied_head: bool) -> int:
    """Qwen2 parameter arithmetic: q/k/v with bias, o without, SwiGLU MLP, two RMSNorms a layer, final norm."""
    hidden, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv_width = config.num_key_value_heads * hidden // config.num_attention_heads
    attention = hidden * hidden + hidden + 2 * (hidden * kv_width + kv_width) + hidden * hidden
    layer = attention + 3 * hidden * ffn + 2 * hidden
    return vocab * hidden * (2 if untied_head else 1) + config.num_hidden_layers * layer + hidden


def test_paper_setup_reports_the_published_7b_sizes() -> None:
    setup = paper_setup(LMMode.LORA)
    assert setup.student.kind is StudentKind.QWEN2_5_OMNI and setup.lm_lr == 5e-6
    report = dry_run(setup.student, setup.teacher_model, setup.strategy)

    teacher_config = qwen2_7b_config()
    assert report.teacher_params == _qwen2_decoder_params(teacher_config, untied_head=True) == 7_615_616_512
    # The thinker's LM has Qwen2.5-7B's shape exactly, so the same arithmetic gives its count.
    assert report.part(LM).params == 7_615_616_512
    assert 0.6e9 < report.part(AUDIO_ENCODER).params < 0.7e9  # Whisper-large-v3-sized encoder (32 x 1280)
    assert (
        0.6e9 < report.part(VISION).params < 0.7e9
    )  # the released ViT (1280 wide), not transformers' 3584 default
    assert 8.8e9 < report.student_params < 9.0e9
    # LoRA r=8 on all seven projections of 28 layers: r·(in+out) summed
    hidden, ffn, kv = 3584, 18944, 512
    per_layer = 8 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + 3 * (hidden + ffn))
    assert report.part(LM).trainable == 28 * per_layer


def _memory(strategy: Strategy) -> Callable[[str], float]:
    estimate = estimate_memory(
        student_params=8_000_000_000, trainable_params=7_000_000_000, teacher_params=7_000_000_000,
        largest_unit=500_000_000, dims=LMDims(3584, 18944, 28, 152064), encoder_dims=None, strategy=strategy,
    )  # fmt: skip
    return lambda key: getattr(estimate, key)


def test_memory_scales_with_sharding_and_precision() -> None:
    base = Strategy(n_gpus=8, sharding=Sharding.DDP)
    ddp, zero1, zero2, zero3 = (
        _memory(replace(base, sharding=s))
        for s in (Sharding.DDP, Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3)
    )
    fsdp = _memory(replace(base, sharding=Sharding.FSDP))
    assert zero3("total") < zero2("total") < zero1("total") < ddp("total")
    assert fsdp("total") == zero3("total")
    assert zero1("optimizer_states") * 8 == ddp("optimizer_states") == 7_000_000_000 * 8
    assert zero1("master_weights") * 8 == ddp("master_weights") and zero1("gradients") == ddp("gradients")
    assert zero2("gradients") * 8 == ddp("gradients") and zero2("student_weights") == ddp("student_weights")
    assert zero3("student_weights") * 8 == ddp("student_weights") and zero3("teacher_weights") * 8 == ddp(
        "teacher_weights"
    )
    assert ddp("gather_buffers") == 0 < zero3("gather_buffers")
    sixteen = _memory(replace(base, sharding=Sharding.ZERO3, n_gpus=16))
    assert sixteen("optimizer_states") * 2 == zero3("optimizer_states")

    fp32 = _memory(replace(base, precision=DType.FLOAT32))
    assert fp32("master_weights") == 0 and fp32("student_weights") == 2 * ddp("student_weights")
    assert _memory(replace(base, teacher_online=False))("teacher_weights") == 0
    assert _memory(replace(base, sharding=Sharding.DDP, teacher_sharded=True))("teacher_weights") * 8 == ddp(
        "teacher_weights"
    )


def test_activation_and_logit_estimates_follow_their_formulas() -> None:
    strategy = Strategy(n_gpus=1, micro_batch=2, seq_len=512, response_len=128, kd_chunk_rows=64)
    memory = _memory(strategy)
    hidden, ffn, layers, vocab = 3584, 18944, 28, 152064
    assert memory("activations_full") == 2 * 512 * layers * (6 * hidden + 4 * ffn) * 2
    assert memory("activations_checkpointed") == 2 * 512 * (layers * hidden + 6 * hidden + 4 * ffn) * 2
    assert memory("kd_buffer_full") == 4 * 2 * 512 * vocab * 4
    assert memory("kd_buffer_chunked") == 4 * 64 * vocab * 4
    assert memory("activations") == memory("activations_checkpointed") and memory("kd_buffer") == memory(
        "kd_buffer_chunked"
    )
    unchunked = _memory(replace(strategy, grad_checkpointing=False, chunked_kd=False))
    assert unchunked("total") - memory("total") == (
        memory("activations_full")
        - memory("activations_checkpointed")
        + memory("kd_buffer_full")
        - memory("kd_buffer_chunked")
    )


def test_bad_inputs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="student.hf_model"):
        dry_run(StudentSettings(kind=StudentKind.QWEN2_AUDIO, hf_model="nowhere/at-all"), "smollm2", ONE_GPU)
    with pytest.raises(UserError, match="needs qwen2_5_omni_thinker"):
        dry_run(
            StudentSettings(kind=StudentKind.QWEN2_5_OMNI, hf_model="Qwen/Qwen2-Audio-7B"), "smollm2", ONE_GPU
        )
    with pytest.raises(UserError, match="teacher.model"):
        dry_run(StudentSettings(), str(tmp_path / "missing"), ONE_GPU)
    with pytest.raises(UserError, match="target_modules"):
        dry_run(
            StudentSettings(lm_mode=LMMode.LORA, lora=LoraSettings(target_modules=["nope"])),
            "smollm2",
            ONE_GPU,
        )
    with pytest.raises(UserError, match="strategy.response_len"):
        Strategy(seq_len=8, response_len=9)


def test_print_dry_run_shows_parts_memory_and_formulas() -> None:
    from rich.console import Console

    report = dry_run(StudentSettings(), "smollm2", ONE_GPU)
    console = Console(record=True, width=160)
    print_dry_run(report, console)
    text = console.export_text()
    for expected in (
        "audio encoder",
        "projector",
        "AdamW",
        "estimate",
        "B·T·L·(6H+4I)",
        "total",
        "fits in 80 GiB",
    ):
        assert expected in text
    assert report.fits and report.memory.total < 80 * GIB


def test_strategy_for_a_train_config_takes_what_the_config_holds() -> None:
    from cmkd.stage_configs import LossSettings, MixedPrecision, TeacherSource, TrainConfig, TrainSettings

    config = TrainConfig(
        train=TrainSettings(
            batch_size=3, mixed_precision=MixedPrecision.NO, teacher_source=TeacherSource.CACHE
        ),
        loss=LossSettings(chunk_size=128),
    )
    strategy = strategy_for(config, n_gpus=4, sharding=Sharding.ZERO2)
    assert (strategy.micro_batch, strategy.kd_chunk_rows, strategy.n_gpus) == (3, 128, 4)
    assert strategy.precision is DType.FLOAT32 and not strategy.teacher_online
    bf16 = replace(config, train=replace(config.train, mixed_precision=MixedPrecision.BF16))
    assert strategy_for(bf16).precision is DType.BFLOAT16
