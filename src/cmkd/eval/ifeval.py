"""IFEval instruction checkers (strict and loose), our own implementation of Google IFEval's documented rules.

VoiceBench's ifeval subset reuses Google's IFEval: every item lists `instruction_id_list` and matching `kwargs`.
Strict checks the raw response. Loose also accepts the response with its first line, last line or both removed,
each with and without `*` markup, because a model that wraps a correct answer in "Sure! Here it is:" still
followed the instruction. VoiceBench's `final` = mean(prompt strict, instruction strict, prompt loose,
instruction loose).

What differs from Google's code, on purpose:
- `language:response_language` needs a language detector we do not ship; it is reported as unsupported (counted
  per item and in the summary), never passed silently. `change_case:english_*` check the case only.
- Words are `\\w+` runs (IFEval's nltk regex tokenizer does the same); sentences are split on `.`/`!`/`?` followed
  by whitespace and on line breaks, a simpler rule than IFEval's abbreviation-aware splitter.
- Keywords and markers are matched literally (IFEval puts them into a regex unescaped).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cmkd.errors import UserError
from cmkd.eval.scorers import ScoreResult

Checker = Callable[[str, Mapping[str, Any]], bool]


def _compare(count: int, relation: str, target: Any) -> bool:
    """IFEval's two relations: "less than" (strictly fewer) and "at least"."""
    if relation == "less than":
        return count < int(target)
    if relation == "at least":
        return count >= int(target)
    raise ValueError(f"relation {relation!r} is not 'less than' or 'at least'")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+|\n+", text) if part.strip()]


def _number_words(response: str, args: Mapping[str, Any]) -> bool:
    return _compare(len(_words(response)), args["relation"], args["num_words"])


def _number_sentences(response: str, args: Mapping[str, Any]) -> bool:
    return _compare(len(_sentences(response)), args["relation"], args["num_sentences"])


def _number_paragraphs(response: str, args: Mapping[str, Any]) -> bool:
    """Paragraphs are separated by the markdown divider `***`; an empty paragraph inside the text fails."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == int(args["num_paragraphs"])


def _nth_paragraph_first_word(response: str, args: Mapping[str, Any]) -> bool:
    """Paragraphs separated by blank lines: the count must match and paragraph n must start with the word."""
    paragraphs = [part for part in re.split(r"\n\n", response) if part.strip()]
    nth = int(args["nth_paragraph"])
    if len(paragraphs) != int(args["num_paragraphs"]) or not 1 <= nth <= len(paragraphs):
        return False
    first = re.match(r"\W*(\w+)", paragraphs[nth - 1])
    return first is not None and first.group(1).lower() == str(args["first_word"]).strip().lower()


def _keywords_exist(response: str, args: Mapping[str, Any]) -> bool:
    lowered = response.lower()
    return all(str(keyword).lower() in lowered for keyword in args["keywords"])


def _keyword_frequency(response: str, args: Mapping[str, Any]) -> bool:
    count = len(re.findall(re.escape(str(args["keyword"])), response, flags=re.IGNORECASE))
    return _compare(count, args["relation"], args["frequency"])


def _forbidden_words(response: str, args: Mapping[str, Any]) -> bool:
    return not any(
        re.search(rf"\b{re.escape(str(word))}\b", response, flags=re.IGNORECASE)
        for word in args["forbidden_words"]
    )


def _letter_frequency(response: str, args: Mapping[str, Any]) -> bool:
    count = response.lower().count(str(args["letter"]).lower())
    return _compare(count, args["let_relation"], args["let_frequency"])


def _number_placeholders(response: str, args: Mapping[str, Any]) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= int(args["num_placeholders"])


def _postscript(response: str, args: Mapping[str, Any]) -> bool:
    """A line starting with the marker; "P.S." and "P.P.S" also accept a space after each dot ("p. s.")."""
    marker = str(args["postscript_marker"]).strip()
    if marker.upper() == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker.upper() == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def _number_bullets(response: str, args: Mapping[str, Any]) -> bool:
    """Markdown bullets: lines starting with `* ` (not `**`) or `-`; the count must be exact."""
    star_bullets = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dash_bullets = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(star_bullets) + len(dash_bullets) == int(args["num_bullets"])


def _constrained_response(response: str, args: Mapping[str, Any]) -> bool:
    return any(
        option in response for option in ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    )


def _highlighted_sections(response: str, args: Mapping[str, Any]) -> bool:
    """Count non-empty `*highlighted*` and `**bold**` spans on one line each."""
    single = [span for span in re.findall(r"\*[^\n\*]*\*", response) if span.strip("*").strip()]
    double = [span for span in re.findall(r"\*\*[^\n\*]*\*\*", response) if span.strip("*").strip()]
    return len(single) + len(double) >= int(args["num_highlights"])


def _multiple_sections(response: str, args: Mapping[str, Any]) -> bool:
    splitter = re.escape(str(args["section_spliter"]).strip())
    sections = re.split(r"\s?" + splitter + r"\s?\d+\s?", response)
    return len(sections) - 1 >= int(args["num_sections"])


def _json_format(response: str, args: Mapping[str, Any]) -> bool:
    """The whole response parses as JSON, optionally inside a ``` or ```json fence."""
    text = response.strip()
    text = re.sub(r"^```(?:json)?", "", text, flags=re.IGNORECASE)
    text = re.sub(r"```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _title(response: str, args: Mapping[str, Any]) -> bool:
    return any(title.strip() for title in re.findall(r"<<([^\n]+)>>", response))


def _two_responses(response: str, args: Mapping[str, Any]) -> bool:
    """Exactly two different non-empty answers separated by six asterisks."""
    parts = response.split("******")
    kept: list[str] = []
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            kept.append(part.strip())
    return len(kept) == 2 and kept[0] != kept[1]


def _repeat_prompt(response: str, args: Mapping[str, Any]) -> bool:
    return response.strip().lower().startswith(str(args["prompt_to_repeat"]).strip().lower())


def _end_phrase(response: str, args: Mapping[str, Any]) -> bool:
    return response.strip().strip('"').lower().endswith(str(args["end_phrase"]).strip().lower())


def _quotation(response: str, args: Mapping[str, Any]) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _capital_word_frequency(response: str, args: Mapping[str, Any]) -> bool:
    capitals = [word for word in _words(response) if word.isupper()]
    return _compare(len(capitals), args["capital_relation"], args["capital_frequency"])


CHECKERS: dict[str, Checker] = {
    "length_constraints:number_words": _number_words,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "keywords:existence": _keywords_exist,
    "keywords:frequency": _keyword_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullets,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_phrase,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": lambda response, args: response.isupper(),
    "change_case:english_lowercase": lambda response, args: response.islower(),
    "punctuation:no_comma": lambda response, args: "," not in response,
}


def loose_variants(response: str) -> list[str]:
    """The response, without its first/last/both lines, each also with `*` removed (IFEval's loose set)."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [variant.replace("*", "") for variant in trimmed]


def check_instruction(
    instruction_id: str, response: str, args: Mapping[str, Any] | None, *, loose: bool
) -> bool:
    """Whether the response follows one supported instruction; an empty response follows nothing."""
    checker = CHECKERS.get(instruction_id)
    if checker is None:
        raise UserError(f"ifeval {instruction_id}: unsupported instruction id")
    # HF datasets store one kwargs schema for all rows, so unused keys arrive as None: drop them.
    clean_args = {key: value for key, value in (args or {}).items() if value is not None}
    candidates = loose_variants(response) if loose else [response]
    try:
        return any(bool(candidate.strip()) and checker(candidate, clean_args) for candidate in candidates)
    except KeyError as exc:
        raise UserError(f"ifeval {instruction_id}: missing argument {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise UserError(f"ifeval {instruction_id}: bad arguments {clean_args}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class IfevalItemResult:
    """Per-instruction outcomes for one response; unsupported ids are kept aside, not scored."""

    checked_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]
    unsupported_ids: tuple[str, ...]

    @property
    def scorable(self) -> bool:
        """At least one instruction could be checked; otherwise the item is left out of the prompt-level rate."""
        return bool(self.checked_ids)


def check_ifeval(
    response: str, instruction_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any] | None]
) -> IfevalItemResult:
    """Check every instruction of one item, strict and loose."""
    if len(instruction_ids) != len(kwargs_list):
        raise UserError(
            f"ifeval: {len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs entries; they must pair up"
        )
    if not instruction_ids:
        raise UserError("ifeval: item has no instructions")
    checked, strict, loose, unsupported = [], [], [], []
    for instruction_id, args in zip(instruction_ids, kwargs_list, strict=True):
        if instruction_id not in CHECKERS:
            unsupported.append(instruction_id)
            continue
        checked.append(instruction_id)
        strict.append(check_instruction(instruction_id, response, args, loose=False))
        loose.append(check_instruction(instruction_id, response, args, loose=True))
    return IfevalItemResult(tuple(checked), tuple(strict), tuple(loose), tuple(unsupported))


def score_ifeval(
    response: str,
    instruction_ids: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
    *,
    loose: bool = False,
) -> ScoreResult:
    """Prompt-level score: 1.0 if every supported instruction is followed (strict or loose).

    `parsed` is False when no instruction of the item is supported, so the item shows up as unscorable rather
    than as a pass or a fail; the detail names the unsupported ids either way.
    """
    result = check_ifeval(response, instruction_ids, kwargs_list)
    outcomes = result.loose if loose else result.strict
    note = f"; unsupported: {', '.join(result.unsupported_ids)}" if result.unsupported_ids else ""
    if not result.scorable:
        return ScoreResult(0.0, False, f"no supported instruction{note}")
    failed = [iid for iid, ok in zip(result.checked_ids, outcomes, strict=True) if not ok]
    detail = f"failed: {', '.join(failed)}" if failed else "all followed"
    return ScoreResult(float(not failed), True, detail + note)


@dataclasses.dataclass(frozen=True)
class IfevalSummary:
    """VoiceBench's four IFEval accuracies (points, 0-100), their mean, and what could not be scored."""

    prompt_strict: float
    instruction_strict: float
    prompt_loose: float
    instruction_loose: float
    final: float
    n_prompts: int
    n_instructions: int
    n_unsupported_instructions: int
    n_prompts_unscorable: int


def summarise_ifeval(results: Sequence[IfevalItemResult]) -> IfevalSummary:
    """Aggregate item results; items with no supported instruction are excluded and counted."""
    scorable = [result for result in results if result.scorable]
    if not scorable:
        raise UserError("ifeval: no item has a supported instruction; nothing to score")
    strict_flags = [flag for result in scorable for flag in result.strict]
    loose_flags = [flag for result in scorable for flag in result.loose]
    prompt_strict = 100.0 * sum(all(result.strict) for result in scorable) / len(scorable)
    prompt_loose = 100.0 * sum(all(result.loose) for result in scorable) / len(scorable)
    instruction_strict = 100.0 * sum(strict_flags) / len(strict_flags)
    instruction_loose = 100.0 * sum(loose_flags) / len(loose_flags)
    return IfevalSummary(
        prompt_strict=prompt_strict,
        instruction_strict=instruction_strict,
        prompt_loose=prompt_loose,
        instruction_loose=instruction_loose,
        final=(prompt_strict + instruction_strict + prompt_loose + instruction_loose) / 4,
        n_prompts=len(scorable),
        n_instructions=len(strict_flags),
        n_unsupported_instructions=sum(len(result.unsupported_ids) for result in results),
        n_prompts_unscorable=len(results) - len(scorable),
    )
