"""Per-GPU memory of a distillation run under DDP, FSDP full-shard or DeepSpeed ZeRO-1/2/3 (pure arithmetic).

Weights, gradients, fp32 master weights and AdamW states are exact byte counts from parameter counts and the
sharding rules (ZeRO-1 splits optimizer state, ZeRO-2 also gradients, ZeRO-3/FSDP also weights, across N GPUs).
Activations and the logits/KD buffer are estimates from B, T and the LM's sizes; each comes with its formula so a
user can see what is assumed. Kept apart from `cmkd.models.dry_run` (which counts parameters on the meta device)
so a benchmark can price a plan from numbers alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cmkd.config import StrEnum
from cmkd.errors import UserError
from cmkd.stage_configs import DType

GIB = 1024**3
BYTES_PER_VALUE = {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2}
FP32_BYTES = 4
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
WHISPER_WINDOW_FRAMES = 1500  # 30 s of audio after the encoder's stride-2 conv: the worst case per clip


class Sharding(StrEnum):
    """How state is split across GPUs: plain DDP, FSDP full-shard, or DeepSpeed ZeRO stage 1/2/3."""

    DDP = "ddp"
    FSDP = "fsdp"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"

    @property
    def shards_optimizer(self) -> bool:
        return self is not Sharding.DDP

    @property
    def shards_gradients(self) -> bool:
        return self in (Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP)

    @property
    def shards_weights(self) -> bool:
        return self in (Sharding.ZERO3, Sharding.FSDP)


@dataclass(frozen=True)
class Strategy:
    """The distributed-training plan a memory estimate is made for."""

    n_gpus: int = 8
    sharding: Sharding = Sharding.ZERO3
    precision: DType = DType.BFLOAT16  # weights (student and teacher); trainables also get fp32 master copies
    grad_checkpointing: bool = True
    micro_batch: int = 1  # examples per GPU per forward
    seq_len: int = 1024  # positions per example: prompt (text tokens or audio embeddings) + response
    response_len: int = 256  # response positions per example (the rows the losses read)
    lora_r: int | None = None  # None: student.lora.r
    chunked_kd: bool = True  # project response rows to logits chunk by chunk instead of a full [B, T, V]
    kd_chunk_rows: int = 64  # rows per chunk (loss.chunk_size, whose default this is)
    teacher_online: bool = True  # False: teacher top-k logits come from the prepare-stage cache
    teacher_sharded: bool | None = None  # None: sharded exactly when the student's weights are
    gpu_memory_gib: float = 80.0

    def __post_init__(self) -> None:
        for name in ("n_gpus", "micro_batch", "seq_len", "response_len", "kd_chunk_rows"):
            if getattr(self, name) < 1:
                raise UserError(f"strategy.{name}: must be >= 1, got {getattr(self, name)}")
        if self.response_len > self.seq_len:
            raise UserError(f"strategy.response_len: {self.response_len} exceeds seq_len {self.seq_len}")
        if self.lora_r is not None and self.lora_r < 1:
            raise UserError(f"strategy.lora_r: must be >= 1, got {self.lora_r}")
        if self.gpu_memory_gib <= 0:
            raise UserError(f"strategy.gpu_memory_gib: must be > 0, got {self.gpu_memory_gib}")


@dataclass(frozen=True)
class LMDims:
    """The LM sizes activation and logits estimates use."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU. Activations and the KD buffer are given both ways; `total` counts the strategy's choice."""

    student_weights: int
    gradients: int
    master_weights: int
    optimizer_states: int
    teacher_weights: int
    gather_buffers: int
    activations_checkpointed: int
    activations_full: int
    kd_buffer_chunked: int
    kd_buffer_full: int
    grad_checkpointing: bool
    chunked_kd: bool
    formulas: dict[str, str] = field(default_factory=dict)

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.grad_checkpointing else self.activations_full

    @property
    def kd_buffer(self) -> int:
        return self.kd_buffer_chunked if self.chunked_kd else self.kd_buffer_full

    @property
    def total(self) -> int:
        fixed = self.student_weights + self.gradients + self.master_weights + self.optimizer_states
        return fixed + self.teacher_weights + self.gather_buffers + self.activations + self.kd_buffer


def estimate_memory(
    *,
    student_params: int,
    trainable_params: int,
    teacher_params: int,
    largest_unit: int,
    dims: LMDims,
    encoder_dims: tuple[int, int, int] | None,
    strategy: Strategy,
) -> MemoryEstimate:
    """Per-GPU bytes; `encoder_dims` (width, ffn, layers) only when the audio encoder trains (else it runs
    without a graph and keeps no activations)."""
    n, value = strategy.n_gpus, BYTES_PER_VALUE[DType(strategy.precision)]
    sharding = Sharding(strategy.sharding)
    weight_split = n if sharding.shards_weights else 1
    grad_split = n if sharding.shards_gradients else 1
    optim_split = n if sharding.shards_optimizer else 1
    teacher_sharded = (
        sharding.shards_weights if strategy.teacher_sharded is None else strategy.teacher_sharded
    )
    teacher_split = n if teacher_sharded else 1
    master = FP32_BYTES if value < FP32_BYTES else 0  # fp32 weights are their own master copy
    batch, seq = strategy.micro_batch, strategy.seq_len
    hidden, ffn, layers = dims.hidden, dims.intermediate, dims.layers

    # Saved for backward per token and layer (SDPA/flash attention, SwiGLU MLP): the norm inputs and outputs,
    # q/k/v and the attention output (≈6H) plus gate, up, silu(gate) and their product (4I).
    per_layer = 6 * hidden + 4 * ffn
    full = batch * seq * layers * per_layer * value
    checkpointed = batch * seq * (layers * hidden + per_layer) * value  # layer inputs + one layer recomputed
    act_formula = f"B·T·L·(6H+4I)·{value} B"
    ckpt_formula = f"B·T·(L·H + 6H+4I)·{value} B"
    if encoder_dims is not None:
        width, encoder_ffn, encoder_layers = encoder_dims
        encoder_full = batch * WHISPER_WINDOW_FRAMES * encoder_layers * (6 * width + 2 * encoder_ffn) * value
        full += encoder_full
        checkpointed += encoder_full
        act_formula += " + encoder B·1500·L_enc·(6D+2F)"
        ckpt_formula += " + encoder (not checkpointed)"
    # Four fp32 [rows, V] tensors: student logits, their log-softmax, its gradient, the teacher's probabilities.
    chunk_rows = min(strategy.kd_chunk_rows, batch * strategy.response_len)
    gather = 2 * largest_unit * value if (sharding.shards_weights or teacher_sharded) else 0

    formulas = {
        "student_weights": f"P·{value} B / {weight_split}",
        "gradients": f"P_train·{value} B / {grad_split}"
        + (" (+ a bucket copy unless gradient_as_bucket_view)" if sharding is Sharding.DDP else ""),
        "master_weights": f"P_train·{master} B / {optim_split}" if master else "none (fp32 weights)",
        "optimizer_states": f"P_train·8 B (AdamW m, v fp32) / {optim_split}",
        "teacher_weights": f"P_teacher·{value} B / {teacher_split}"
        if strategy.teacher_online
        else "0 (cached logits)",
        "gather_buffers": f"2 × largest layer·{value} B (prefetch)" if gather else "0 (nothing sharded)",
        "activations_full": act_formula,
        "activations_checkpointed": ckpt_formula,
        "kd_buffer_full": "4 × B·T·V·4 B",
        "kd_buffer_chunked": f"4 × min(chunk, B·R)·V·4 B, chunk {strategy.kd_chunk_rows}",
    }
    return MemoryEstimate(
        student_weights=student_params * value // weight_split,
        gradients=trainable_params * value // grad_split,
        master_weights=trainable_params * master // optim_split,
        optimizer_states=trainable_params * ADAMW_STATE_BYTES // optim_split,
        teacher_weights=teacher_params * value // teacher_split if strategy.teacher_online else 0,
        gather_buffers=gather,
        activations_checkpointed=checkpointed,
        activations_full=full,
        kd_buffer_chunked=4 * chunk_rows * dims.vocab * FP32_BYTES,
        kd_buffer_full=4 * batch * seq * dims.vocab * FP32_BYTES,
        grad_checkpointing=strategy.grad_checkpointing,
        chunked_kd=strategy.chunked_kd,
        formulas=formulas,
    )
