"""What the loop needs before its first step: the training records and the teacher's side of the KD term.

The checks here are the method's preconditions, refused with a clear message rather than trained around:
KD needs a shared vocabulary; a cached teacher must match the run (teacher, tokenizer, k, τ); gold-answer
targets with KD need the teacher online (the cache holds rows along ŷ, not along y).
"""

from __future__ import annotations

from typing import Any

from cmkd.data.logit_cache import CacheMeta, LogitCacheReader, read_meta, tokenizer_hash
from cmkd.data.records import PairedRecord, read_manifest, resolve_manifest_path
from cmkd.errors import UserError
from cmkd.models.vocab import check_vocab
from cmkd.stage_configs import CETarget, TeacherSource, TrainConfig
from cmkd.train.teacher_rows import CachedTeacherRows, OnlineTeacherRows

LOGIT_CACHE_DIR = "teacher_logits"


def load_train_records(cfg: TrainConfig) -> list[PairedRecord]:
    path = resolve_manifest_path(cfg.data.root, cfg.data.train_manifest, "data.train_manifest")
    if not path.is_file():
        raise UserError(f"data.train_manifest: '{path}' not found; run `cmkd prepare` first")
    return read_manifest(path)


def build_teacher_rows(cfg: TrainConfig, student: Any, teacher: Any = None) -> tuple[Any, int]:
    """The teacher-rows provider (None when KD is off) and the number of vocabulary rows both sides compare."""
    student_rows = int(student.lm_head_weight().shape[0])
    if cfg.loss.kd_weight == 0:
        return None, student_rows
    if cfg.train.teacher_source is TeacherSource.CACHE:
        if cfg.loss.ce_target is CETarget.GOLD:
            raise UserError(
                "loss.ce_target: gold targets with kd_weight > 0 need train.teacher_source=online "
                "(the cache holds teacher rows along ŷ, not along the gold answer)"
            )
        cache_dir = cfg.data.root / LOGIT_CACHE_DIR
        found = read_meta(cache_dir)
        expected = CacheMeta(
            teacher=cfg.teacher.model,
            tokenizer_hash=tokenizer_hash(student.tokenizer),
            vocab_size=found.vocab_size,
            k=cfg.teacher.logits_top_k,
            temperature=cfg.loss.temperature,
        )
        reader = LogitCacheReader(cache_dir, expected)
        plan = check_vocab(student.tokenizer, student.tokenizer, found.vocab_size, student_rows, True)
        return CachedTeacherRows(reader), plan.slice_to
    if teacher is None:
        from cmkd.models.build import build_teacher

        teacher = build_teacher(cfg.teacher, trust_remote_code=cfg.run.trust_remote_code)
    plan = check_vocab(teacher.tokenizer, student.tokenizer, teacher.vocab_size, student_rows, True)
    return OnlineTeacherRows(teacher, plan.slice_to), plan.slice_to
