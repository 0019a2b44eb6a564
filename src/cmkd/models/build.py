"""`build_student(settings)` and `build_teacher(settings)`: settings in, ready models out (lingua style).

Parts not passed in are loaded from the embedded default or a local path (`cmkd.models.loading`, `cmkd.assets`);
tests pass tiny in-memory models instead. A passed-in LM (or encoder) that the student will train is deep-copied
first, so the caller's object (often also the teacher's) is never changed; see `cmkd.models.teacher` on isolation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from cmkd.errors import UserError
from cmkd.models.composable import ComposableSpeechLM, prepare_lm
from cmkd.models.encoder import WhisperSpeechEncoder, load_whisper_encoder
from cmkd.models.posterior import load_whisper_with_tokenizer
from cmkd.models.posterior_connector import PosteriorConnector, build_posterior_connector
from cmkd.models.projector import Projector, build_projector
from cmkd.models.teacher import TORCH_DTYPES, TextTeacher
from cmkd.stage_configs import DType, LMMode, ProjectorKind, StudentKind, StudentSettings, TeacherSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IN_MEMORY = "<in-memory>"
"""Source recorded for a part passed in as an object (a checkpoint then names it by its config path if known)."""


def _source_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or IN_MEMORY)


def build_student(
    settings: StudentSettings,
    *,
    lm: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    encoder: WhisperSpeechEncoder | nn.Module | None = None,
    speech_tokenizer: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
) -> ComposableSpeechLM:
    """The student `settings` describe; `lm`+`tokenizer` and `encoder` replace loading those parts.

    The posterior connector (projector.kind=posterior) needs the whole Whisper model (decoder and output layer) and
    its tokenizer: pass a WhisperForConditionalGeneration as `encoder` together with `speech_tokenizer`, or neither.
    `trust_remote_code` (run.trust_remote_code) is passed to the LM loader only; it runs code shipped with a model."""
    kind = StudentKind(settings.kind)
    if kind is not StudentKind.COMPOSABLE:
        from cmkd.models.hf_students import build_hf_student

        if lm is not None or encoder is not None:
            raise ValueError("build_student: HF speech LLMs are loaded whole from student.hf_model")
        student = build_hf_student(settings)
        if settings.init_from:
            student.load(Path(settings.init_from))
        return student  # type: ignore[return-value]
    if (lm is None) != (tokenizer is None):
        raise ValueError("build_student: pass lm and tokenizer together, or neither")

    mode = LMMode(settings.lm_mode)
    if lm is None or tokenizer is None:
        from cmkd.models.loading import load_causal_lm

        lm, tokenizer = load_causal_lm(settings.lm, trust_remote_code=trust_remote_code)
        lm_source = settings.lm
    else:
        lm_source = _source_of(lm)
        if mode is not LMMode.FROZEN:
            lm = copy.deepcopy(lm)  # the student trains its own weights, never the caller's object

    posterior = ProjectorKind(settings.projector.kind) is ProjectorKind.POSTERIOR
    if posterior and settings.encoder_trainable:
        raise UserError(
            "student.encoder_trainable: the posterior connector decodes with a frozen Whisper, so no gradient "
            "reaches the encoder; set it false or use projector.kind=stack_mlp"
        )
    if encoder is None and posterior:
        encoder, loaded_tokenizer = load_whisper_with_tokenizer(settings.encoder)
        speech_tokenizer = speech_tokenizer or loaded_tokenizer
        speech_encoder = WhisperSpeechEncoder.from_model(encoder)
        encoder_source = settings.encoder
    elif encoder is None:
        speech_encoder = load_whisper_encoder(settings.encoder)
        encoder_source = settings.encoder
    else:
        if settings.encoder_trainable:
            encoder = copy.deepcopy(encoder)  # as for the LM: train a copy, never the caller's object
        speech_encoder = (
            encoder if isinstance(encoder, WhisperSpeechEncoder) else WhisperSpeechEncoder.from_model(encoder)
        )
        encoder_source = _source_of(speech_encoder.whisper)
    speech_encoder.set_trainable(settings.encoder_trainable)

    projector: Projector | PosteriorConnector
    if posterior:
        if not hasattr(encoder, "proj_out") or speech_tokenizer is None:
            raise UserError(
                "student.projector.kind=posterior: needs the whole Whisper model (WhisperForConditionalGeneration, "
                "with its decoder) and its tokenizer, not an encoder alone"
            )
        lm_embeddings = lm.get_input_embeddings().weight
        projector = build_posterior_connector(
            settings.projector, encoder, speech_tokenizer, lm_embeddings, tokenizer
        )
    else:
        lm_dim = lm.get_input_embeddings().embedding_dim
        projector = build_projector(settings.projector, speech_encoder.hidden_size, lm_dim)
    student = ComposableSpeechLM(
        speech_encoder,
        projector.to(lm.get_input_embeddings().weight.device),
        prepare_lm(lm, mode, settings.lora),
        tokenizer,
        settings=settings,
        sources={"lm": lm_source, "encoder": encoder_source},
    )
    if settings.init_from:
        student.load(Path(settings.init_from))
    return student


def build_teacher(
    settings: TeacherSettings,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
) -> TextTeacher:
    """The frozen text teacher `settings.model` names, in `settings.dtype`; loads its own copy unless given one."""
    if (model is None) != (tokenizer is None):
        raise ValueError("build_teacher: pass model and tokenizer together, or neither")
    if model is None or tokenizer is None:
        from cmkd.models.loading import load_causal_lm

        dtype = TORCH_DTYPES[DType(settings.dtype)]
        model, tokenizer = load_causal_lm(settings.model, dtype=dtype, trust_remote_code=trust_remote_code)
    return TextTeacher(model, tokenizer, DType(settings.dtype))
