"""Make a text question speakable, or say why it cannot be spoken well (prepare stage 2).

Cross-modal distillation needs the spoken question Q_a and the text question Q_t to be the SAME question: the
teacher reads Q_t, the TTS speaks it, and the student is trained to answer the audio as the teacher answered the
text. A TTS engine reads "42 km" or "e.g." in its own way (or not at all), so we write out what will be said
("forty-two kilometers", "for example") and then use that normalised text as the new prompt everywhere: the
teacher reads it, the TTS speaks it, the ASR check compares against it. The original is kept in
`meta["original_prompt"]` for reference only.

What cannot be spoken faithfully is rejected with a reason instead of being mangled: code (fenced or not), URLs, emails, markdown
tables, LaTeX, markup, numeric dates (their reading is ambiguous), non-Latin scripts (the default voices are
English), text that is too long, empty after cleaning, or mostly symbols/emoji.

Numbers are spelled by a small hand-written speller (cardinals, decimals, ordinals, years, fractions): it covers
what questions contain and keeps the dependency list short. US spelling is used (the default voices are en-US).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cmkd.errors import UserError

if TYPE_CHECKING:
    from cmkd.data.jsonl_io import RejectsLog
    from cmkd.data.records import PairedRecord

# ---------------------------------------------------------------------------------------------------------------
# Number speller
# ---------------------------------------------------------------------------------------------------------------

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}  # fmt: skip
_LONGEST_SPELLED = 10**15


def number_to_words(number: int) -> str:
    """Cardinal in US English: 1234 -> 'one thousand two hundred thirty-four'; beyond 10^15, digit by digit."""
    if number < 0:
        return "minus " + number_to_words(-number)
    if number >= _LONGEST_SPELLED:
        return digits_to_words(str(number))
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    for scale, name in _SCALES:
        if number >= scale:
            lead, rest = divmod(number, scale)
            return f"{number_to_words(lead)} {name}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def digits_to_words(digits: str) -> str:
    """'007' -> 'zero zero seven' (codes, leading zeros, decimal places)."""
    return " ".join(_ONES[int(digit)] for digit in digits)


def ordinal_to_words(number: int) -> str:
    """21 -> 'twenty-first', 100 -> 'one hundredth'."""
    words = number_to_words(number)
    head, _, last = words.rpartition(" ")
    stem, hyphen, unit = last.rpartition("-")
    if unit in _IRREGULAR_ORDINALS:
        unit = _IRREGULAR_ORDINALS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    last = f"{stem}{hyphen}{unit}"
    return f"{head} {last}" if head else last


def year_to_words(year: int) -> str:
    """1984 -> 'nineteen eighty-four', 1905 -> 'nineteen oh five', 2005 -> 'two thousand five'."""
    if not 1000 <= year <= 2099 or 2000 <= year <= 2009:
        return number_to_words(year)
    century, rest = divmod(year, 100)
    if rest == 0:
        return f"{number_to_words(century)} hundred"
    middle = " oh " if rest < 10 else " "
    return number_to_words(century) + middle + number_to_words(rest)


def decimal_to_words(text: str) -> str:
    """'3.14' -> 'three point one four'; thousands separators are allowed in the whole part."""
    whole, _, fraction = text.replace(",", "").partition(".")
    spoken = number_to_words(int(whole or "0"))
    return f"{spoken} point {digits_to_words(fraction)}" if fraction else spoken


def _plural(words: str) -> str:
    """'nineteen ninety' -> 'nineteen nineties' (decades)."""
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


_FRACTION_NAMES = {2: ("half", "halves"), 4: ("quarter", "quarters")}


def fraction_to_words(numerator: int, denominator: int) -> str:
    """3/4 -> 'three quarters', 2/3 -> 'two thirds'; large denominators read 'x over y'."""
    if denominator == 0 or denominator > 10 or numerator > 99 or denominator == 1:
        return f"{number_to_words(numerator)} over {number_to_words(denominator)}"
    singular, plural = _FRACTION_NAMES.get(denominator, (ordinal_to_words(denominator), ""))
    plural = plural or singular + "s"
    return f"{number_to_words(numerator)} {singular if numerator == 1 else plural}"


# ---------------------------------------------------------------------------------------------------------------
# What is refused
# ---------------------------------------------------------------------------------------------------------------

_REFUSALS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("code block", re.compile(r"```|~~~")),
    ("inline code", re.compile(r"`[^`\n]+`")),
    (  # unfenced code: a def/class/import/return line, `x ** 2`, `print(...)`; case-sensitive, as code is
        "code",
        re.compile(
            r"^\s*(?:def|class)\s+\w+\s*[(:]|^\s*(?:import\s+[\w.]+(?:\s+as\s+\w+)?\s*$|from\s+[\w.]+\s+import\s)"
            r"|^\s*return\s+\S|[A-Za-z_]\w*\s+\*\*\s+\w|\w\*\*\w|\b(?:print|range|len)\([^()\n]*\)",
            re.M,
        ),
    ),
    ("email address", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")),
    (
        "url",
        re.compile(r"\b(?:https?://|ftp://|www\.)\S+|\b[\w-]+\.(?:com|org|net|io|edu|gov|co\.uk)\b", re.I),
    ),
    ("markdown table", re.compile(r"^\s*\|?\s*:?-{3,}:?\s*\|", re.M)),
    ("latex", re.compile(r"\\[A-Za-z]+|\$\$|\\[(\[]|\$[^$\n]*[\\^_{}][^$\n]*\$")),
    ("markup", re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>]*)?/?>")),
    ("code-like symbols", re.compile(r"[{}]|==|!=|&&|\|\||=>|->|;\s*$", re.M)),
    ("numeric date", re.compile(r"\b\d{1,4}[/-]\d{1,2}[/-]\d{1,4}\b")),
)
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$", re.M)


@dataclass(frozen=True)
class SpeakableLimits:
    """Bounds on what is worth speaking; longer questions make long clips and slow, noisy training."""

    max_chars: int = 1000
    max_words: int = 120
    min_speakable_ratio: float = 0.6
    max_non_latin_ratio: float = 0.1


@dataclass(frozen=True)
class SpeakableResult:
    """`text` is the new prompt (None when rejected); `changes` lists each rewrite as "'42' -> 'forty-two'"."""

    text: str | None
    reject_reason: str | None
    changes: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.text is not None


def _refuse(reason: str, detail: str = "") -> SpeakableResult:
    return SpeakableResult(None, reason, [], detail)


def _check_refusals(text: str, limits: SpeakableLimits) -> SpeakableResult | None:
    if len(text) > limits.max_chars:
        return _refuse("too long", f"{len(text)} characters > {limits.max_chars}")
    for reason, pattern in _REFUSALS:
        found = pattern.search(text)
        if found:
            return _refuse(reason, f"found {found.group(0).strip()[:40]!r}")
    if len(_TABLE_ROW.findall(text)) >= 2:
        return _refuse("markdown table", "two or more '| ... |' rows")
    letters = [ch for ch in text if ch.isalpha()]
    non_latin = sum(1 for ch in letters if "LATIN" not in unicodedata.name(ch, ""))
    if letters and non_latin / len(letters) > limits.max_non_latin_ratio:
        return _refuse("non-latin script", f"{non_latin} of {len(letters)} letters")
    # Punctuation is neutral (a voice pauses on it); letters, digits and symbols we spell out count as speakable.
    visible = [ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P")]
    speakable = sum(1 for ch in visible if ch.isalnum() or ch in "+*/=<>%$€£°^&@#")
    if visible and speakable / len(visible) < limits.min_speakable_ratio:
        return _refuse("mostly non-letters", f"{speakable} of {len(visible)} characters are speakable")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Rewrites, applied in order; each is (pattern, function of the match)
# ---------------------------------------------------------------------------------------------------------------

_NUMBER = r"\d[\d,]*(?:\.\d+)?"
_UNITS = {
    "km/h": "kilometers per hour", "mph": "miles per hour", "km": "kilometer", "cm": "centimeter",
    "mm": "millimeter", "m": "meter", "kg": "kilogram", "mg": "milligram", "g": "gram", "lb": "pound",
    "lbs": "pound", "ml": "milliliter", "mL": "milliliter", "L": "liter", "ft": "foot", "mi": "mile",
    "GB": "gigabyte", "MB": "megabyte", "kB": "kilobyte", "KB": "kilobyte", "TB": "terabyte", "Hz": "hertz",
    "kHz": "kilohertz", "MHz": "megahertz", "GHz": "gigahertz", "ms": "millisecond", "min": "minute",
    "hr": "hour", "hrs": "hour", "kW": "kilowatt",
}  # fmt: skip
_UNIT_PLURALS = {"foot": "feet", "hertz": "hertz", "kilohertz": "kilohertz", "megahertz": "megahertz",
                 "gigahertz": "gigahertz", "kilometers per hour": "kilometers per hour",
                 "miles per hour": "miles per hour"}  # fmt: skip
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
               "£": ("pound", "pounds", "penny", "pence")}  # fmt: skip
_ABBREVIATIONS = (
    (r"\betc\.$", "et cetera."), (r"\be\.g\.", "for example"), (r"\bi\.e\.", "that is"), (r"\betc\.", "et cetera"),
    (r"\bvs\.?(?=\s)", "versus"), (r"\bapprox\.", "approximately"), (r"\bDr\.", "Doctor"),
    (r"\bMrs\.", "Missus"), (r"\bMr\.", "Mister"), (r"\bMs\.", "Miz"), (r"\bProf\.", "Professor"),
    (r"\bMt\.", "Mount"), (r"\bJr\.", "Junior"), (r"\bSr\.", "Senior"), (r"\bNo\.(?=\s*\d)", "number"),
)  # fmt: skip
_YEAR_CONTEXT = (
    r"in|since|year|by|from|until|till|before|after|during|around|circa|January|February|March|April|May|June"
    r"|July|August|September|October|November|December"
)
_OPERATORS = {"+": "plus", "×": "times", "*": "times", "÷": "divided by", "/": "divided by", "=": "equals",
              "<": "less than", ">": "greater than", "^": "to the power of", "-": "minus"}  # fmt: skip


def _is_one(amount: str) -> bool:
    return amount.replace(",", "") in ("1", "1.0")


def _spell_amount(amount: str) -> str:
    return decimal_to_words(amount) if "." in amount else number_to_words(int(amount.replace(",", "")))


def _spell_unit(match: re.Match[str]) -> str:
    name = _UNITS[match.group(2)]
    if not _is_one(match.group(1)):
        name = _UNIT_PLURALS.get(name, name + "s")
    return f"{_spell_amount(match.group(1))} {name}"


def _spell_currency(match: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[match.group(1)]
    amount, scale = match.group(2), match.group(3)
    if scale:
        return f"{_spell_amount(amount)} {scale} {many}"
    whole, _, cents = amount.replace(",", "").partition(".")
    spoken = f"{number_to_words(int(whole))} {one if whole == '1' else many}"
    if len(cents) == 2 and int(cents):
        spoken += f" and {number_to_words(int(cents))} {sub_one if cents == '01' else sub_many}"
    elif cents and int(cents):
        return f"{decimal_to_words(amount)} {many}"
    return spoken


def _spell_time(match: re.Match[str]) -> str:
    hour, minute, suffix = int(match.group(1)), int(match.group(2)), match.group(3)
    if minute == 0:
        spoken = number_to_words(hour) + ("" if suffix else " o'clock")
    else:
        spoken = number_to_words(hour) + (" oh " if minute < 10 else " ") + number_to_words(minute)
    if suffix:
        spoken += " a m" if suffix.lower().startswith("a") else " p m"
    return spoken


def _spell_temperature(match: re.Match[str]) -> str:
    scale = "Celsius" if match.group(3) == "C" else "Fahrenheit"
    sign = "minus " if match.group(1) else ""
    return f"{sign}{_spell_amount(match.group(2))} degrees {scale}"


def _spell_range(match: re.Match[str]) -> str:
    """'5-10' -> 'five to ten'; a decreasing pair written with a hyphen ('10-3') is a subtraction."""
    low, high = int(match.group(1)), int(match.group(2))
    if low >= high and "–" not in match.group(0):
        return f"{number_to_words(low)} minus {number_to_words(high)}"
    both_years = all(1100 <= n <= 2099 for n in (low, high))
    spell = year_to_words if both_years else number_to_words
    return f"{spell(low)} to {spell(high)}"


def _spell_plain_number(match: re.Match[str]) -> str:
    """The catch-all for numbers left after the specific rules; pads with spaces when glued to letters (H2O)."""
    text = match.group(0)
    digits = text.replace(",", "")
    if "." in digits:
        spoken = decimal_to_words(digits)
    elif len(digits) > 1 and digits.startswith("0"):
        spoken = digits_to_words(digits)
    else:
        spoken = number_to_words(int(digits))
    before = match.string[match.start() - 1] if match.start() > 0 else " "
    after = match.string[match.end()] if match.end() < len(match.string) else " "
    return (" " if before.isalpha() else "") + spoken + (" " if after.isalpha() else "")


Rewrite = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]
_REWRITES: tuple[Rewrite, ...] = (
    *((re.compile(pattern), (lambda _m, spoken=spoken: spoken)) for pattern, spoken in _ABBREVIATIONS),
    (re.compile(r"#(?=\d)"), lambda _m: "number "),
    (re.compile(r"\b(\d{1,2}):([0-5]\d)(?:\s*([AaPp]\.?[Mm](?:\.(?=\s+[a-z]))?)(?![A-Za-z]))?"), _spell_time),
    (re.compile(r"\b(\d+):(\d+)\b"), lambda m: f"{number_to_words(int(m[1]))} to {number_to_words(int(m[2]))}"),
    (re.compile(r"\b(\d+)'\s?(\d+)\"(?!\w)"), lambda m: f"{number_to_words(int(m[1]))} feet {number_to_words(int(m[2]))} inches"),
    (re.compile(rf"([$€£])\s?({_NUMBER})(?:\s(thousand|million|billion|trillion)\b)?"), _spell_currency),
    (re.compile(rf"(?<![\w-])(-?)({_NUMBER})\s?°\s?([CF])\b"), _spell_temperature),
    (re.compile(rf"({_NUMBER})\s?°"), lambda m: f"{_spell_amount(m.group(1))} degrees"),
    (re.compile(rf"({_NUMBER})\s?%"), lambda m: f"{_spell_amount(m.group(1))} percent"),
    (re.compile(rf"({_NUMBER})\s?({'|'.join(sorted(map(re.escape, _UNITS), key=len, reverse=True))})(?![\w/])"),
     _spell_unit),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b"), lambda m: ordinal_to_words(int(m.group(1)))),
    (re.compile(r"\b(\d+)(?:\s?–\s?|-)(\d+)\b"), _spell_range),
    (re.compile(r"\b(1[1-9]\d|20\d)0s\b"), lambda m: _plural(year_to_words(int(m.group(1)) * 10))),
    (re.compile(rf"\b({_YEAR_CONTEXT})\s+(1\d\d\d|20\d\d)\b", re.I),
     lambda m: f"{m.group(1)} {year_to_words(int(m.group(2)))}"),
    (re.compile(r"\b(1[1-9]\d\d|20\d\d)\s*(BCE|BC|AD|CE)\b"),
     lambda m: f"{year_to_words(int(m.group(1)))} {' '.join(m.group(2))}"),
    (re.compile(r"\b(\d{1,2})/(\d{1,2})\b"), lambda m: fraction_to_words(int(m.group(1)), int(m.group(2)))),
    (re.compile(r"(?<=[\d\s])([+×*÷/=<>^-])(?=\s*-?\d)|(?<=\d)\s+([+×*÷/=<>^-])\s+"),
     lambda m: f" {_OPERATORS[(m.group(1) or m.group(2))]} "),
    (re.compile(r"(?<![\w])-(?=\d)"), lambda _m: "minus "),
    (re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"), _spell_plain_number),
    (re.compile(r"\s*&\s*"), lambda _m: " and "),
    (re.compile(r"(?<=\s)@(?=\s)"), lambda _m: "at"),
    (re.compile(r"\s*=\s*"), lambda _m: " equals "),
    (re.compile(r"(?<=[\w+])\+(?!\w)|\s\+\s"), lambda _m: " plus "),
    (re.compile(r"\s*%"), lambda _m: " percent"),
    (re.compile(r"π"), lambda _m: "pi"),
)  # fmt: skip

_MARKDOWN = (
    (re.compile(r"^\s{0,3}#{1,6}\s+", re.M), ""),
    (re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.M), ""),
    (re.compile(r"(\*\*|__)(\S(?:.*?\S)?)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])"), r"\1"),
)
_QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "\u2044": "/", "—": ", ", "\u00a0": " "})
_LEFTOVER_MARKS = re.compile(r"[*_#|\[\]\\~^<>`@]")


def _join_lines(text: str) -> str:
    """Lines become sentences: a line without closing punctuation gets a period so the TTS pauses there."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = [
        line if i == len(lines) - 1 or line[-1] in ".!?:;," else line + "." for i, line in enumerate(lines)
    ]
    return " ".join(joined)


def _drop_symbols(text: str) -> tuple[str, int]:
    """Remove emoji and other pictographs/marks a voice cannot read; returns the text and how many went."""
    kept = [ch for ch in text if unicodedata.category(ch) not in ("So", "Sk", "Co", "Cn", "Cs", "Cf", "Cc")
            or ch in "\n\t"]  # fmt: skip
    cleaned = _LEFTOVER_MARKS.sub(" ", "".join(kept))
    removed = len(text) - len("".join(kept)) + len(_LEFTOVER_MARKS.findall("".join(kept)))
    return cleaned, removed


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,!?;:])", r"\1", text)
    return re.sub(r"([,;:])(?=[^\s\d])", r"\1 ", text)


def make_speakable(text: str, limits: SpeakableLimits | None = None) -> SpeakableResult:
    """Normalise `text` into the words a voice will say, or reject it with a reason (see the module docstring)."""
    if not isinstance(text, str):
        raise UserError(f"text: must be a string, got {type(text).__name__}")
    limits = limits or SpeakableLimits()
    original = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    refusal = _check_refusals(original, limits)
    if refusal is not None:
        return refusal
    changes: list[str] = ["normalised unicode punctuation"] if original != text else []
    current = original
    for pattern, replacement in _MARKDOWN:
        current = pattern.sub(replacement, current)
    if current != original:
        changes.append("removed markdown formatting")
    current = _join_lines(current)
    for pattern, spell in _REWRITES:
        current = pattern.sub(lambda m, spell=spell: _logged(m, spell, changes), current)
    current, removed = _drop_symbols(current)
    if removed:
        changes.append(f"removed {removed} symbol(s) a voice cannot read")
    current = _tidy(current)
    if not any(ch.isalpha() for ch in current):
        return _refuse("empty after cleaning", f"{text[:40]!r}")
    words = len(current.split())
    if words > limits.max_words:
        return _refuse("too long", f"{words} words > {limits.max_words}")
    return SpeakableResult(current, None, changes)


def _logged(match: re.Match[str], spell: Callable[[re.Match[str]], str], changes: list[str]) -> str:
    spoken = spell(match)
    if spoken.strip() != match.group(0).strip():
        changes.append(f"{match.group(0).strip()!r} -> {spoken.strip()!r}")
    return spoken


def speakable_records(
    records: Iterable[PairedRecord], rejects: RejectsLog, limits: SpeakableLimits | None = None
) -> list[PairedRecord]:
    """Stage 2 over records: the normalised text replaces `prompt`; rejects go to `rejects`.

    Records that already carry speech (VoiceBench, human recordings) keep their prompt untouched: it is the
    transcript of audio that exists, and rewriting it would break the text/speech pairing.
    """
    kept: list[PairedRecord] = []
    for record in records:
        if record.speech:
            kept.append(record)
            continue
        result = make_speakable(record.prompt, limits)
        if result.text is None:
            rejects.add(record.id, "text.prompt", result.reject_reason or "unspeakable", result.detail)
            continue
        meta = dict(record.meta)
        if result.text != record.prompt:
            meta["original_prompt"] = record.prompt
            meta["speakable_changes"] = result.changes
        kept.append(replace(record, prompt=result.text, meta=meta))
    return kept
