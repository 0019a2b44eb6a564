"""Scoring one answer to one eval item, by the item's scorer (`cmkd.eval.suites.ScoringKind`).

Every scorer returns a lenient score (VoiceBench's convention: a random guess for an unparsed multiple-choice or
bbh answer), a strict one (unparsed is wrong) and whether an answer was parsed at all. The modality gap of a model
that stops answering in speech mode is a parse failure, not a knowledge gap, and the report must be able to tell
the two apart. Agreement with the teacher's text answer (normalised exact match, and the first three words) is
added for every scorer: it measures whether the student says what the teacher says, whatever the gold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cmkd.data.demo_questions import slot_words
from cmkd.data.records import PairedRecord
from cmkd.errors import UserError
from cmkd.eval.ifeval import score_ifeval
from cmkd.eval.judge import JudgeClient, judge_open_ended
from cmkd.eval.scorers import ScoringMode, score_bbh, score_mcq, score_reference_qa, score_refusal
from cmkd.eval.suites import EvalItem, ScoringKind
from cmkd.eval.text_match import agrees, first_k_words_agree, gold_match, slot_recall

_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n")


@dataclass(frozen=True)
class ItemScore:
    """One answer scored: lenient and strict scores in [0, 1], parsed, how, and scorer-specific extras."""

    score: float
    strict: float
    parsed: bool
    detail: str
    metrics: dict[str, float | None]


def _meta_list(record: PairedRecord, name: str) -> list[Any]:
    value = record.meta.get(name)
    if isinstance(value, str):  # some exports store nested fields as JSON text
        value = json.loads(value)
    if not isinstance(value, list):
        raise UserError(
            f"{record.id}: meta.{name} must be a list for ifeval scoring, got {type(value).__name__}"
        )
    return value


def _gold(record: PairedRecord, kind: ScoringKind) -> str:
    gold = record.answer if kind is ScoringKind.MCQ and record.answer else record.target or record.answer
    if not gold:
        raise UserError(f"{record.id}: a {kind.value} item needs a gold answer (target or answer)")
    return gold


def score_item(
    item: EvalItem,
    response: str,
    *,
    teacher_response: str | None,
    fallback_key: str,
    judge: JudgeClient | None = None,
) -> ItemScore:
    """Score one response to `item`; `teacher_response` (the teacher's text-mode answer) feeds agreement.

    `fallback_key` seeds VoiceBench's random guess for unparsed answers: give it the item AND the mode, so the
    text and speech runs of one unparsed item do not share a guess (see cmkd.eval.scorers)."""
    record, kind = item.record, item.scoring
    metrics: dict[str, float | None] = {}
    if teacher_response is not None:
        metrics["agree"] = float(agrees(response, teacher_response))
        metrics["first3"] = float(first_k_words_agree(response, teacher_response, 3))
    if kind is ScoringKind.SHORT_ANSWER:
        gold = _gold(record, kind)
        aliases = [str(alias) for alias in record.meta.get("aliases", []) or []]
        lenient = gold_match(response, gold, aliases)
        # Strict: the gold must be in the first sentence, so a ramble that names every colour eventually, or
        # "Kenia is the capital of Kenya", does not count as knowing the answer.
        in_first = gold_match(_FIRST_SENTENCE.split(response.strip(), maxsplit=1)[0], gold, aliases)
        metrics["slot_recall"] = slot_recall(response, slot_words(record))
        how = "gold in first sentence" if in_first else "gold found later" if lenient else "gold not found"
        return ItemScore(float(lenient), float(in_first), bool(response.strip()), how, metrics)
    if kind is ScoringKind.AGREEMENT:
        if teacher_response is None:
            raise UserError(f"{record.id}: no gold answer and no teacher answer to agree with")
        agreed = metrics["agree"] or 0.0
        return ItemScore(agreed, agreed, bool(response.strip()), "agreement with the teacher", metrics)
    if kind is ScoringKind.MCQ:
        gold, choices = _gold(record, kind), record.choices
        lenient_result = score_mcq(response, gold, choices=choices, fallback_key=fallback_key)
        strict_result = score_mcq(response, gold, choices=choices, mode=ScoringMode.STRICT)
    elif kind is ScoringKind.BINARY:
        gold = _gold(record, kind)
        bbh_id = record.meta.get("id") if isinstance(record.meta.get("id"), str) else record.id
        lenient_result = score_bbh(response, gold, str(bbh_id), fallback_key=fallback_key)
        strict_result = score_bbh(response, gold, str(bbh_id), mode=ScoringMode.STRICT)
    elif kind is ScoringKind.IFEVAL:
        ids, kwargs = _meta_list(record, "instruction_id_list"), _meta_list(record, "kwargs")
        lenient_result = score_ifeval(response, ids, kwargs, loose=True)
        strict_result = score_ifeval(response, ids, kwargs, loose=False)
    elif kind is ScoringKind.REFUSAL:
        lenient_result = strict_result = score_refusal(response)
    elif kind is ScoringKind.REFERENCE_QA:
        aliases = [str(alias) for alias in record.meta.get("aliases", []) or []]
        lenient_result = strict_result = score_reference_qa(response, _gold(record, kind), aliases)
    else:
        if judge is None:
            raise UserError(f"{record.id}: open-ended items need a judge (eval.judge_url)")
        lenient_result = strict_result = judge_open_ended(judge, record.prompt, response)
    return ItemScore(
        lenient_result.score, strict_result.score, lenient_result.parsed, lenient_result.detail, metrics
    )
