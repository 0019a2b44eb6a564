"""The settings of every stage (`cmkd prepare|train|eval|demo`), one dataclass per component.

Each component owns a small section (lingua style); a stage config is a handful of sections. Field docs are the
`--help` text. Values are checked when a config is loaded (`cmkd.config.load_config`): bounds on the field,
cross-field rules in `validate()`. Nothing here rewrites a value the user gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from cmkd.config import StrEnum, param
from cmkd.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Categorical choices
# ---------------------------------------------------------------------------------------------------------------


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LMMode(StrEnum):
    """How the student's language model trains: not at all, through LoRA adapters, or every weight."""

    FROZEN = "frozen"
    LORA = "lora"
    FULL = "full"


class FeatureKind(StrEnum):
    """What the prepare stage caches per clip: encoder frames (frame projectors) or Whisper's decoded posteriors
    (the posterior connector); a student reads the cache only when it was made for its own connector."""

    FRAMES = "frames"
    POSTERIOR = "posterior"


class ProjectorKind(StrEnum):
    """Speech connector: stack k encoder frames then an MLP (ultravox style), a strided 1-D conv stack, or the
    speech model's per-token posteriors bridged into the LM's embedding space (carries words from step 0)."""

    STACK_MLP = "stack_mlp"
    CONV = "conv"
    POSTERIOR = "posterior"


class Activation(StrEnum):
    SWIGLU = "swiglu"
    GELU = "gelu"


class StudentKind(StrEnum):
    """Composable encoder+projector+LM, or a real HF speech LLM."""

    COMPOSABLE = "composable"
    QWEN2_AUDIO = "qwen2_audio"
    QWEN2_5_OMNI = "qwen2_5_omni"


class CETarget(StrEnum):
    """Hard targets of the cross-entropy term: the teacher's own response ŷ (the method) or the gold answer y."""

    TEACHER = "teacher"
    GOLD = "gold"


class Divergence(StrEnum):
    """Soft-target term: KL(p_T‖p_S) (the paper), KL(p_S‖p_T), or generalized JSD with weight β."""

    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"


class TeacherSource(StrEnum):
    """Run the teacher during training, or read its top-k logits from the prepare-stage cache."""

    ONLINE = "online"
    CACHE = "cache"


class Schedule(StrEnum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class MixedPrecision(StrEnum):
    """Autocast precision (accelerate's names); `no` means fp32."""

    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    out_dir: Path = param(
        Path("runs/latest"), "Run directory: resolved config, checkpoints, logs and outputs go here."
    )
    seed: int = param(0, "Seed for every random number generator the stage uses.", ge=0)
    threads: int = param(0, "torch CPU threads (0: torch's default).", ge=0)
    overwrite: bool = param(False, "Allow writing into a run directory made by a different config.")
    trust_remote_code: bool = param(
        False, "Let transformers run code shipped with a model. Off unless you trust it."
    )


@dataclass
class TeacherSettings:
    model: str = param(
        "smollm2",
        "Teacher LM: 'smollm2' (embedded default), a local model dir, a .gguf file, or a hub id when online.",
    )
    system_prompt: str = param(
        "Answer the question in a few words.", "System prompt the teacher reads with every question."
    )
    max_new_tokens: int = param(24, "Longest teacher response, in tokens.", ge=1, le=4096)
    dtype: DType = param(DType.FLOAT32, "Precision the frozen teacher runs in.")
    batch_size: int = param(16, "Questions per batched generation call.", ge=1)
    do_sample: bool = param(False, "Sample responses instead of greedy decoding.")
    sample_temperature: float = param(1.0, "Sampling temperature when do_sample is true.", gt=0)
    logits_top_k: int = param(
        64, "Top-k teacher log-probs cached per response token (0: no logit cache).", ge=0
    )
    logits_temperature: float = param(
        2.0, "Temperature τ of the cached teacher distribution (must equal train.temperature).", gt=0
    )


@dataclass
class ProjectorSettings:
    kind: ProjectorKind = param(ProjectorKind.STACK_MLP, "Speech connector architecture.")
    stack: int = param(
        8, "Encoder frames stacked into one LM position (50 frames/s / 8 = 6.25 audio tokens/s).", ge=1
    )
    hidden: int = param(1024, "Hidden width of the projector MLP (posterior: of its residual MLP).", ge=1)
    activation: Activation = param(Activation.GELU, "Projector non-linearity.")
    posterior_top_k: int = param(
        8, "Posterior connector: Whisper's k most likely tokens kept per decoded step.", ge=1, le=256
    )
    posterior_max_tokens: int = param(
        96,
        "Posterior connector: most Whisper tokens decoded per clip (= LM positions per clip).",
        ge=1,
        le=440,
    )
    posterior_window_s: float = param(
        10.0,
        "Posterior connector: each clip is padded with silence to at least this many seconds (and 7 s past its "
        "end) before Whisper decodes it; Whisper only stops on trailing silence.",
        gt=0,
        le=30,
    )


@dataclass
class LoraSettings:
    r: int = param(8, "LoRA rank.", ge=1)
    alpha: int = param(16, "LoRA scaling numerator (scale = alpha / r).", ge=1)
    dropout: float = param(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] = param(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names LoRA wraps.",
    )


@dataclass
class StudentSettings:
    kind: StudentKind = param(StudentKind.COMPOSABLE, "Student family.")
    lm: str = param("smollm2", "Student LM backbone (same forms as teacher.model).")
    encoder: str = param(
        "whisper-tiny.en", "Speech encoder: 'whisper-tiny.en' (embedded) or a local Whisper dir."
    )
    hf_model: str = param(
        "", "Local dir of a Qwen2-Audio / Qwen2.5-Omni checkpoint when kind is not composable."
    )
    encoder_trainable: bool = param(False, "Train the speech encoder too (frozen by default).")
    lm_mode: LMMode = param(LMMode.FROZEN, "How the LM trains.")
    lora: LoraSettings = param(factory=LoraSettings, doc="LoRA settings, used when lm_mode is lora.")
    projector: ProjectorSettings = param(factory=ProjectorSettings, doc="Projector settings.")
    init_from: str = param("", "Checkpoint dir of trainable weights to start from (e.g. a stage-A student).")

    def validate(self) -> None:
        if self.kind is not StudentKind.COMPOSABLE and not self.hf_model:
            raise UserError(f"student.hf_model: required when student.kind is {self.kind.value}")


@dataclass
class LossSettings:
    ce_target: CETarget = param(
        CETarget.TEACHER, "Hard targets: the teacher's response ŷ or the gold answer y."
    )
    ce_weight: float = param(1.0, "Weight of the cross-entropy term.", ge=0)
    kd_weight: float = param(0.5, "λ: weight of the τ²-scaled divergence term (0 turns KD off).", ge=0)
    temperature: float = param(2.0, "τ: softening temperature of teacher and student distributions.", gt=0)
    divergence: Divergence = param(Divergence.FORWARD_KL, "Divergence between teacher and student.")
    jsd_beta: float = param(0.5, "β of the generalized JSD.", ge=0, le=1)
    chunk_size: int = param(
        64,
        "Response rows projected to logits at once in the chunked loss (64: peak loss memory 0.09-0.15x the naive "
        "full-vocabulary loss at no time cost, benchmarks/results/kd_loss.md).",
        ge=1,
    )

    def validate(self) -> None:
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise UserError("loss: ce_weight and kd_weight are both 0; nothing would be trained")


@dataclass
class TrainSettings:
    text_to_text: bool = param(True, "Train the T→T channel (student reads the text query).")
    speech_to_text: bool = param(True, "Train the S→T channel (student reads the spoken query).")
    speech_share: float = param(
        0.5, "Fraction of micro-batches drawn from S→T when both channels are on.", ge=0, le=1
    )
    teacher_source: TeacherSource = param(
        TeacherSource.CACHE, "Online teacher or the prepare-stage logit cache."
    )
    steps: int = param(200, "Optimizer steps (0: derive from epochs).", ge=0)
    epochs: float = param(0.0, "Passes over the data when steps is 0.", ge=0)
    batch_size: int = param(8, "Examples per micro-batch per process.", ge=1)
    grad_accum: int = param(1, "Micro-batches per optimizer step.", ge=1)
    lr: float = param(2e-3, "Peak learning rate of the projector.", gt=0)
    lora_lr: float = param(2e-4, "Peak learning rate of LoRA adapters.", gt=0)
    lm_lr: float = param(5e-6, "Peak learning rate of full LM weights (lm_mode full).", gt=0)
    encoder_lr: float = param(
        1e-5, "Peak learning rate of the speech encoder (student.encoder_trainable).", gt=0
    )
    weight_decay: float = param(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int = param(10, "Linear warmup steps.", ge=0)
    schedule: Schedule = param(Schedule.COSINE, "Decay after warmup.")
    min_lr_ratio: float = param(0.1, "Final learning rate as a fraction of the peak.", ge=0, le=1)
    max_grad_norm: float = param(1.0, "Gradient clipping norm (0: off).", ge=0)
    mixed_precision: MixedPrecision = param(
        MixedPrecision.NO, "Autocast precision where the device supports it."
    )
    activation_checkpointing: bool = param(
        False,
        "Recompute the LM's layer activations in the backward pass instead of keeping them: measured 0.52x vs "
        "0.72x the naive loop's peak memory at 1.3-1.4x the step time (benchmarks/results/end_to_end.md).",
    )
    save_every: int = param(50, "Checkpoint every this many optimizer steps (and at the end).", ge=1)
    log_every: int = param(5, "Write metrics every this many optimizer steps.", ge=1)
    max_minutes: float = param(
        0.0, "Stop after this much wall-clock time (0: no limit); the schedule still spans `steps`.", ge=0
    )

    def validate(self) -> None:
        if not (self.text_to_text or self.speech_to_text):
            raise UserError(
                "train: text_to_text and speech_to_text are both false; enable at least one channel"
            )
        if self.steps == 0 and self.epochs == 0:
            raise UserError("train.steps: 0 needs train.epochs > 0")


@dataclass
class DataSettings:
    root: Path = param(
        Path("data/demo"), "Data root: manifests and audio live under it; audio paths are relative to it."
    )
    train_manifest: str = param("train.jsonl", "Training manifest, relative to root.")
    eval_manifest: str = param("heldout.jsonl", "Held-out manifest, relative to root.")
    sample_rate: int = param(16000, "Sample rate every clip is resampled to.", ge=8000)
    max_audio_seconds: float = param(30.0, "Clips longer than this are rejected.", gt=0)

    def validate(self) -> None:
        # Manifests stay inside the data root, as audio paths do (a config may come from someone else).
        for key in ("train_manifest", "eval_manifest"):
            name = getattr(self, key)
            path = PurePosixPath(name)
            if not name.strip() or path.is_absolute() or PureWindowsPath(name).drive or ".." in path.parts:
                raise UserError(
                    f"data.{key}: '{name}' must be a relative path inside data.root (not absolute, no '..')"
                )


@dataclass
class SourceSettings:
    kind: str = param(
        "demo", "Where questions come from: demo (built-in set), jsonl, parquet, openorca, voicebench."
    )
    path: str = param("", "File or dir of the source (unused for demo).")
    id_field: str = param("id", "Field holding the item id.")
    prompt_field: str = param("question", "Field holding the question text.")
    target_field: str = param("answer", "Field holding the gold answer.")
    system_field: str = param("", "Field holding a per-item system prompt (empty: none).")
    limit: int = param(0, "Read at most this many items (0: all).", ge=0)
    heldout_fraction: float = param(
        0.1,
        "Share of items held out (hashed by id) when the source names no split; the demo set names its own.",
        ge=0,
        lt=1,
    )
    every: int = param(
        1, "Keep every n-th good item, in source order (a smaller subset that keeps the mix).", ge=1
    )


@dataclass
class TTSVoice:
    backend: str = param("hibari", "TTS backend: hibari, espeak, or command.")
    voice: str = param("", "Backend voice name (e.g. en-us+m3 for espeak); empty: the backend default.")
    split: str = param("all", "Which split gets this voice: all, train or heldout.")
    command: str = param("", "For backend=command: a shell template with {text} and {out} placeholders.")


@dataclass
class TTSSettings:
    voices: list[TTSVoice] = param(
        factory=lambda: [TTSVoice("hibari", "", "all", ""), TTSVoice("espeak", "en-us+m3", "heldout", "")],
        doc="Voices to synthesise; each question gets one clip per voice whose split matches.",
    )
    workers: int = param(1, "Parallel TTS worker processes.", ge=1)
    max_wer: float = param(0.5, "ASR round-trip word error rate above which a clip is rejected.", ge=0)


@dataclass
class FeatureSettings:
    """The frozen speech-encoder feature cache (prepare stage 6), so training and eval can skip the encoder."""

    enabled: bool = param(True, "Cache frozen speech-encoder features for every kept clip.")
    kind: FeatureKind = param(
        FeatureKind.FRAMES,
        "frames: encoder frames (stack_mlp/conv projectors); posterior: Whisper's decoded top-k posteriors and "
        "decoder states (the posterior connector), decoded once in the ASR check and reused.",
    )
    encoder: str = param(
        "whisper-tiny.en", "Encoder whose frames are cached; must equal student.encoder of the training run."
    )
    dtype: DType = param(
        DType.FLOAT32,
        "Storage precision; float32 keeps cached frames identical to the online encoder (posterior: float32 only).",
    )
    posterior_top_k: int = param(
        8, "kind=posterior: must equal student.projector.posterior_top_k.", ge=1, le=256
    )
    posterior_max_tokens: int = param(
        96, "kind=posterior: must equal student.projector.posterior_max_tokens.", ge=1, le=440
    )
    posterior_window_s: float = param(
        10.0, "kind=posterior: must equal student.projector.posterior_window_s.", gt=0, le=30
    )


@dataclass
class EvalSettings:
    suite: str = param("demo", "Suite: demo, voicebench:<subset>, or a path to a paired manifest.")
    voicebench_dir: str = param("", "Local directory holding VoiceBench in its published layout.")
    batch_size: int = param(16, "Items per batched generation call.", ge=1)
    max_new_tokens: int = param(32, "Longest generated answer, in tokens.", ge=1)
    bootstrap_samples: int = param(2000, "Paired-bootstrap resamples for 95% confidence intervals.", ge=100)
    judge_url: str = param(
        "", "OpenAI-compatible endpoint for the LLM judge (empty: judge-scored subsets are skipped)."
    )
    judge_model: str = param("", "Judge model id at judge_url.")
    cascade: bool = param(
        True, "Also evaluate the ASR cascade: Whisper tiny.en transcript → teacher in text mode."
    )
    mismatched_audio: bool = param(
        False, "Add the control where each item is heard with another item's clip."
    )
    limit: int = param(0, "Evaluate the first N items only (per VoiceBench file); 0: all.", ge=0)
    system_prompt: str = param(
        "", "System prompt for every mode (empty: teacher.system_prompt; a record's own wins)."
    )
    teacher_forced: bool = param(
        True, "Compute teacher-forced KL(teacher‖student) and NLL of the teacher's response."
    )


# ---------------------------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    run: RunSettings = param(factory=lambda: RunSettings(out_dir=Path("data/demo")), doc="Run settings.")
    source: SourceSettings = param(factory=SourceSettings, doc="Question source.")
    data: DataSettings = param(factory=DataSettings, doc="Data layout.")
    teacher: TeacherSettings = param(factory=TeacherSettings, doc="Teacher used to write targets.")
    tts: TTSSettings = param(factory=TTSSettings, doc="Speech synthesis.")
    features: FeatureSettings = param(factory=FeatureSettings, doc="Encoder feature cache.")
    shard: str = param("0/1", "Process shard i/n of the items (e.g. 1/4).")

    def validate(self) -> None:
        parse_shard(self.shard)
        features = self.features
        if (
            features.enabled
            and features.kind is FeatureKind.POSTERIOR
            and features.dtype is not DType.FLOAT32
        ):
            raise UserError(
                f"features.dtype: kind=posterior stores token ids, which {features.dtype.value} rounds; use float32"
            )


@dataclass
class TrainConfig:
    run: RunSettings = param(factory=lambda: RunSettings(out_dir=Path("runs/train")), doc="Run settings.")
    data: DataSettings = param(factory=DataSettings, doc="Training data.")
    teacher: TeacherSettings = param(factory=TeacherSettings, doc="Teacher.")
    student: StudentSettings = param(factory=StudentSettings, doc="Student.")
    loss: LossSettings = param(factory=LossSettings, doc="Loss.")
    train: TrainSettings = param(factory=TrainSettings, doc="Loop.")

    def validate(self) -> None:
        cached = self.train.teacher_source is TeacherSource.CACHE and self.loss.kd_weight > 0
        if cached and self.teacher.logits_temperature != self.loss.temperature:
            raise UserError(
                f"loss.temperature: {self.loss.temperature} differs from teacher.logits_temperature "
                f"{self.teacher.logits_temperature} of the cache; set them equal or use train.teacher_source=online"
            )


@dataclass
class EvalConfig:
    run: RunSettings = param(factory=lambda: RunSettings(out_dir=Path("runs/eval")), doc="Run settings.")
    data: DataSettings = param(factory=DataSettings, doc="Evaluation data.")
    teacher: TeacherSettings = param(factory=TeacherSettings, doc="Teacher (text-mode reference).")
    student: StudentSettings = param(factory=StudentSettings, doc="Student to evaluate.")
    eval: EvalSettings = param(factory=EvalSettings, doc="Evaluation.")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UserError(f"shard: '{text}' is not of the form i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard: '{text}' needs 0 <= i < n")
    return index, count


STAGES: dict[str, type] = {"prepare": PrepareConfig, "train": TrainConfig, "eval": EvalConfig}
