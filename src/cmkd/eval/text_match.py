"""Answer normalisation and matching: gold answers, teacher agreement, slot recall.

Why our own normaliser and not plain lowercase comparison: a speech student and a text teacher phrase the same
answer differently ("Twenty-one." vs "21", "The Nile" vs "nile"), and the modality gap must measure what the
student knows, not how it spells numbers. So both sides go through one normaliser: lowercase, punctuation and
articles dropped, number words turned into digits. Matching is then done on whole tokens, so a short gold like
"no" never matches inside "not" or "nothing".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cmkd.errors import UserError

_ARTICLES = frozenset({"a", "an", "the"})

_UNITS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}
_TEENS = {
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}

# Thousands separators go first ("1,000" -> "1000"), so the comma is not read as a word break.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_APOSTROPHES = re.compile(r"['’‘`]")
# Anything that is not a letter, digit, whitespace or '.' separates words; '_' counts as punctuation too.
_NON_WORD = re.compile(r"[^\w\s.]|_")
# A '.' survives only as a decimal point between two digits ("3.5"); every other '.' is punctuation.
_NON_DECIMAL_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")


def _word_kind(word: str) -> str | None:
    """Classify a number word; the kinds decide which words may follow each other in one number."""
    if word in _UNITS:
        return "unit"
    if word in _TEENS:
        return "teen"
    if word in _TENS:
        return "tens"
    if word == "hundred":
        return "hundred"
    if word in _SCALES:
        return "scale"
    return None


# Which kind may continue a number after which: "twenty one" is one number, "one two" is two numbers.
_MAY_FOLLOW = {
    "unit": {"hundred", "scale"},
    "teen": {"hundred", "scale"},
    "tens": {"unit", "scale"},
    "hundred": {"unit", "teen", "tens", "scale"},
    "scale": {"unit", "teen", "tens"},
}


def _words_to_digits(tokens: list[str]) -> list[str]:
    """Replace each maximal run of English number words with its value in digits.

    Runs are split where English would start a new number ("one two three" -> 1 2 3), and "and" is kept inside
    a number only between a hundred/scale word and a smaller number ("one hundred and five" -> 105).
    """
    out: list[str] = []
    position = 0
    while position < len(tokens):
        kind = _word_kind(tokens[position])
        if kind is None:
            out.append(tokens[position])
            position += 1
            continue
        total, current, last_kind = 0, 0, None
        while position < len(tokens):
            word = tokens[position]
            kind = _word_kind(word)
            if (
                kind is None
                and word == "and"
                and last_kind in ("hundred", "scale")
                and position + 1 < len(tokens)
            ):
                next_kind = _word_kind(tokens[position + 1])
                if next_kind in ("unit", "teen", "tens"):
                    position += 1
                    continue
            if kind is None or (last_kind is not None and kind not in _MAY_FOLLOW[last_kind]):
                break
            if kind == "unit":
                current += _UNITS[word]
            elif kind == "teen":
                current += _TEENS[word]
            elif kind == "tens":
                current += _TENS[word]
            elif kind == "hundred":
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * _SCALES[word]
                current = 0
            last_kind = kind
            position += 1
        out.append(str(total + current))
    return out


def answer_tokens(text: str) -> list[str]:
    """The normalised tokens of `text` (see `normalise_answer`)."""
    lowered = _APOSTROPHES.sub("", text.lower())
    lowered = _THOUSANDS_COMMA.sub("", lowered)
    lowered = _NON_WORD.sub(" ", lowered)
    lowered = _NON_DECIMAL_DOT.sub(" ", lowered)
    return _words_to_digits([token for token in lowered.split() if token not in _ARTICLES])


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, turn number words into digits, collapse whitespace.

    "The answer is Twenty-One!" -> "answer is 21". Apostrophes are removed rather than split on, so "don't"
    stays one token ("dont") and cannot create a spurious "t" token.
    """
    return " ".join(answer_tokens(text))


def _contains_phrase(haystack: list[str], needle: list[str]) -> bool:
    """Whether `needle` occurs as a contiguous run of whole tokens in `haystack`."""
    width = len(needle)
    return any(haystack[start : start + width] == needle for start in range(len(haystack) - width + 1))


def gold_match(answer: str, gold: str, aliases: Sequence[str] = ()) -> bool:
    """Whether the normalised gold (or any alias) occurs in the normalised answer as whole words.

    Whole-token matching is what keeps short golds honest: gold "no" matches "No, it is not." but not "not"
    or "nobody". A gold that normalises to nothing (e.g. only punctuation or "the") cannot be matched and is a
    data error, so it raises instead of silently scoring every answer wrong.
    """
    candidates = [answer_tokens(candidate) for candidate in (gold, *aliases)]
    candidates = [tokens for tokens in candidates if tokens]
    if not candidates:
        raise UserError(f"gold {gold!r}: empty after normalisation (and no usable alias)")
    answer_words = answer_tokens(answer)
    return any(_contains_phrase(answer_words, tokens) for tokens in candidates)


def agrees(student_answer: str, teacher_answer: str) -> bool:
    """Normalised exact match between the student's and the teacher's answers.

    Two answers that both normalise to nothing do not agree: an empty answer is a failure, and counting two
    failures as agreement would inflate agreement for a student that says nothing.
    """
    student = answer_tokens(student_answer)
    return bool(student) and student == answer_tokens(teacher_answer)


def first_k_words_agree(answer_a: str, answer_b: str, k: int = 3) -> bool:
    """Whether the first `k` normalised words of both answers are the same.

    A cheap proxy for "same answer, different continuation" on free-form responses. Answers shorter than `k`
    words must then be equal in full; an empty answer never agrees.
    """
    if k < 1:
        raise UserError(f"k: must be at least 1, got {k}")
    words_a, words_b = answer_tokens(answer_a), answer_tokens(answer_b)
    return bool(words_a) and bool(words_b) and words_a[:k] == words_b[:k]


def slot_recall(student_answer: str, slot_words: Sequence[str]) -> float | None:
    """Fraction of slot words/phrases that occur (whole-word, normalised) in the student's answer.

    Returns None when there is nothing to recall (no slots, or slots that normalise to nothing), so the caller
    drops the item from the mean instead of counting it as 0 or 1.
    """
    slots = [tokens for tokens in (answer_tokens(slot) for slot in slot_words) if tokens]
    if not slots:
        return None
    answer_words = answer_tokens(student_answer)
    found = sum(_contains_phrase(answer_words, tokens) for tokens in slots)
    return found / len(slots)
