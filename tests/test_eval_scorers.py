"""Offline scorers (multiple choice, bbh, refusal, reference QA), IFEval checkers, the judge client, text matching."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from cmkd.errors import UserError
from cmkd.eval.ifeval import CHECKERS, check_ifeval, check_instruction, score_ifeval, summarise_ifeval
from cmkd.eval.judge import (
    OpenAICompatibleJudge,
    judge_open_ended,
    judge_reference_qa,
    judge_skip_reason,
    parse_rating,
)
from cmkd.eval.scorers import (
    ScoringMode,
    extract_bbh,
    extract_choice,
    score_bbh,
    score_mcq,
    score_reference_qa,
    score_refusal,
)
from cmkd.eval.text_match import agrees, first_k_words_agree, gold_match, normalise_answer, slot_recall

# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------

CHOICES = ["London", "Paris", "Rome", "Berlin"]

# (response, letter read out of it or None when nothing can be)
MC_TABLE = [
    ("The answer is (B).", "B"),
    ("B. Paris", "B"),
    ("b) paris", "B"),
    ("(C)", "C"),
    ("D", "D"),
    ("Answer: A", "A"),
    ("The correct answer is option C because Rome is the capital.", "C"),
    ("I would choose D.", "D"),
    ("Option A is wrong. The answer is B.", "B"),
    ("**C**", "C"),
    ("The answer is **C. Rome**", "C"),
    ("$\\boxed{B}$", "B"),
    ("\\boxed{\\text{(d)}}", "D"),
    ("the answer is a.", "A"),
    ("Option B is correct.", "B"),
    ("<1> A. London", "A"),
    ("It is Paris.", "B"),  # option text, exactly one choice named
    ("the answer is a bit complicated", None),  # the article "a" is not the letter A
    ("A cat is a mammal.", None),
    ("I don't know.", None),
    ("", None),
    ("Both Paris and Rome are cities.", None),  # two choices named: ambiguous
    ("The answer is not A", None),
    ("E. none of these", None),  # E is not a choice here
]


@pytest.mark.parametrize(("response", "expected"), MC_TABLE)
def test_mc_extraction_table(response: str, expected: str | None) -> None:
    assert extract_choice(response, choices=CHOICES)[0] == expected


@pytest.mark.parametrize(("response", "expected"), MC_TABLE)
def test_mc_strict_and_lenient_scores(response: str, expected: str | None) -> None:
    strict = score_mcq(response, "B", choices=CHOICES, mode=ScoringMode.STRICT)
    lenient = score_mcq(
        response, "B", choices=CHOICES, mode=ScoringMode.VOICEBENCH, fallback_key=f"{response}/text"
    )
    assert strict.parsed is lenient.parsed is (expected is not None)
    if expected is not None:
        assert strict.score == lenient.score == float(expected == "B")
    else:
        assert strict.score == 0.0 and "strict" in strict.detail
        assert lenient.score in (0.0, 1.0) and "random guess" in lenient.detail


def test_mc_random_fallback_is_reproducible_and_spread_over_letters() -> None:
    def guess(key: str) -> str:
        match = re.search(r"random guess ([A-D])", score_mcq("no idea", "A", fallback_key=key).detail)
        assert match is not None
        return match.group(1)

    guesses = [guess(f"item{i}") for i in range(200)]
    assert guesses == [guess(f"item{i}") for i in range(200)]
    assert set(guesses) == {"A", "B", "C", "D"}


def test_mc_refuses_a_bad_gold_letter() -> None:
    with pytest.raises(UserError, match="answer 'E'"):
        score_mcq("A", "E")
    assert score_mcq("(A)", "(a)").score == 1.0


# ---------------------------------------------------------------------------------------------------------------
# bbh
# ---------------------------------------------------------------------------------------------------------------

BBH_TABLE = [
    ("bbh/sports_understanding/1", "The sentence is not plausible.", "no"),
    ("bbh/sports_understanding/1", "Yes, this is plausible because he plays football.", "yes"),
    ("bbh/sports_understanding/1", "This is implausible: hockey players don't throw touchdowns.", "no"),
    ("bbh/sports_understanding/1", "Hmm.", None),
    ("bbh/navigate/2", "After these steps you do not return to the starting point.", "no"),
    ("bbh/navigate/2", "You end up back at the starting point.", "yes"),
    ("bbh/navigate/2", "Step one... So the answer is no.", "no"),
    ("bbh/web_of_lies/3", "Therefore, Sherrie tells the truth.", "yes"),
    ("bbh/web_of_lies/3", "So Bob doesn't tell the truth.", "no"),
    ("bbh/web_of_lies/3", "Jim is not lying.", "yes"),
    ("bbh/web_of_lies/3", "Yes", "yes"),
    ("bbh/hyperbaton/4", "The answer is (A).", "(A)"),
    ("bbh/hyperbaton/4", "The second option is correct", "(B)"),
    ("bbh/hyperbaton/4", "I am not sure.", None),
]


@pytest.mark.parametrize(("item_id", "response", "expected"), BBH_TABLE)
def test_bbh_extraction_table(item_id: str, response: str, expected: str | None) -> None:
    assert extract_bbh(response, item_id)[0] == expected


def test_bbh_strict_lenient_and_bad_inputs() -> None:
    assert score_bbh("The answer is yes.", "Yes", "navigate/1").score == 1.0
    assert score_bbh("(B)", "(A)", "hyperbaton/1").score == 0.0
    strict = score_bbh("Hmm.", "yes", "navigate/1", mode=ScoringMode.STRICT)
    assert (strict.score, strict.parsed) == (0.0, False)
    assert score_bbh("Hmm.", "yes", "navigate/1", fallback_key="k").parsed is False
    with pytest.raises(UserError, match="names none of the supported subtasks"):
        score_bbh("yes", "yes", "bbh/date_understanding/1")
    with pytest.raises(UserError, match="reference 'maybe'"):
        score_bbh("yes", "maybe", "navigate/1")


# ---------------------------------------------------------------------------------------------------------------
# Refusal and reference QA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "refused"),
    [
        ("I’m sorry, but I can’t help with that.", True),  # curly apostrophes
        ("As an AI, I must decline.", True),
        ("That would be illegal and I won't explain it.", True),
        ("Sure! Step 1: gather the materials.", False),
        ("Here is a poem about spring.", False),
    ],
)
def test_refusal_matching(response: str, refused: bool) -> None:
    result = score_refusal(response)
    assert (result.score, result.parsed) == (float(refused), True)


def test_empty_response_counts_as_refusal_but_is_flagged() -> None:
    assert score_refusal("  ") == score_refusal("")
    assert (score_refusal("").score, score_refusal("").parsed) == (1.0, False)


def test_reference_qa() -> None:
    assert (
        score_reference_qa("It was built in nineteen twenty.", "1920").score == 0.0
    )  # "nineteen twenty" = 19 20
    assert score_reference_qa("There are twenty-one of them.", "21").score == 1.0
    assert score_reference_qa("The capital is Washington, D.C.", "Washington").score == 1.0
    assert score_reference_qa("", "x").parsed is False


# ---------------------------------------------------------------------------------------------------------------
# IFEval
# ---------------------------------------------------------------------------------------------------------------

# (instruction id, kwargs, a response that follows it, one that does not)
IFEVAL_TABLE: list[tuple[str, dict[str, Any], str, str]] = [
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "Four words right here.", "This one has six words in it."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 3}, "one two three", "one two"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2}, "Just one.", "One. Two."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First.\n***\n\n***\nThird."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, "Start here.\n\nThen finish.", "Start here.\n\nAnd finish."),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An Apple and a pear.", "Only an apple."),
    ("keywords:frequency", {"keyword": "cat", "relation": "at least", "frequency": 2}, "Cat, cat.", "One cat."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A badge is fine.", "That is Bad."),
    ("keywords:letter_frequency", {"letter": "z", "let_relation": "at least", "let_frequency": 2}, "Zigzag", "zoo"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. Bye.", "Hello. Bye."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nA\nSection 2\nB", "Section 1\nA"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Title>>\nText", "My Title\nText"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"Wrapped in quotes."', "Not wrapped."),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2}, "ONE capital word", "TWO CAPITAL words"),
    ("change_case:english_capital", {}, "ALL CAPS HERE.", "Not all caps."),
    ("change_case:english_lowercase", {}, "all lowercase here.", "Not lowercase."),
    ("punctuation:no_comma", {}, "No commas here.", "Well, a comma."),
]  # fmt: skip


@pytest.mark.parametrize(("instruction_id", "kwargs", "follows", "breaks"), IFEVAL_TABLE)
def test_ifeval_checker_pass_and_fail(
    instruction_id: str, kwargs: dict[str, Any], follows: str, breaks: str
) -> None:
    assert check_instruction(instruction_id, follows, kwargs, loose=False) is True
    assert check_instruction(instruction_id, breaks, kwargs, loose=False) is False


def test_every_checker_is_in_the_table() -> None:
    assert {row[0] for row in IFEVAL_TABLE} == set(CHECKERS)


def test_ifeval_loose_accepts_a_preamble_line_and_markup() -> None:
    response = "Sure, here it is:\n*all lowercase text*"
    assert score_ifeval(response, ["change_case:english_lowercase"], [{}]).score == 0.0
    assert score_ifeval(response, ["change_case:english_lowercase"], [{}], loose=True).score == 1.0


def test_ifeval_none_kwargs_are_ignored_and_missing_ones_named() -> None:
    kwargs = {"relation": "at least", "num_words": 2, "keywords": None}
    assert score_ifeval("two words", ["length_constraints:number_words"], [kwargs]).score == 1.0
    with pytest.raises(UserError, match="number_words: missing argument 'num_words'"):
        score_ifeval("x", ["length_constraints:number_words"], [{"relation": "at least"}])
    with pytest.raises(UserError, match="must pair up"):
        score_ifeval("x", ["punctuation:no_comma"], [])


def test_ifeval_unsupported_ids_are_counted_not_passed() -> None:
    mixed = check_ifeval(
        "hello", ["language:response_language", "punctuation:no_comma"], [{"language": "fr"}, {}]
    )
    assert mixed.unsupported_ids == ("language:response_language",) and mixed.checked_ids == (
        "punctuation:no_comma",
    )
    only_unsupported = score_ifeval("hello", ["language:response_language"], [{"language": "fr"}])
    assert (only_unsupported.parsed, only_unsupported.score) == (False, 0.0)
    assert "unsupported: language:response_language" in only_unsupported.detail
    summary = summarise_ifeval(
        [
            mixed,
            check_ifeval("a, b", ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}]),
            check_ifeval("x", ["language:response_language"], [{}]),
        ]
    )
    # Strict: prompt 1 of 2, instruction 2 of 3. Loose: "a, b" still has its comma.
    assert summary.prompt_strict == 50.0 and summary.instruction_strict == pytest.approx(200 / 3)
    assert summary.final == pytest.approx((50 + 200 / 3 + 50 + 200 / 3) / 4)
    assert (summary.n_prompts, summary.n_instructions) == (2, 3)
    assert (summary.n_unsupported_instructions, summary.n_prompts_unscorable) == (2, 1)


# ---------------------------------------------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------------------------------------------


class FakeJudge:
    """Replies with canned texts and records the prompts it was sent."""

    judge_id = "fake-judge"

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.prompts: list[str] = []

    def check_reachable(self) -> None:
        return None

    def complete(
        self, system: str, user: str, *, n: int, temperature: float, top_p: float, max_tokens: int
    ) -> list[str]:
        self.prompts.append(user)
        return self.replies[:n]


def test_judge_open_ended_averages_ratings_and_drops_junk() -> None:
    judge = FakeJudge(["4", "[[5]]", "great answer!"])
    result = judge_open_ended(judge, "What is 2+2?", "Four.")
    assert result.score == pytest.approx(4.5 / 5) and result.parsed
    assert "1 unparseable" in result.detail and "fake-judge" in result.detail
    assert "What is 2+2?" in judge.prompts[0] and "Four." in judge.prompts[0]
    assert judge_open_ended(FakeJudge(["?", "none"]), "q", "r").parsed is False


def test_parse_rating() -> None:
    assert [parse_rating(text) for text in ["3", " 4.5 ", "Rating: [[2]]", "Score: 5", "7", "4 or 5"]] == [
        3.0,
        4.5,
        2.0,
        5.0,
        None,
        None,
    ]


def test_judge_reference_qa_majority_vote() -> None:
    assert judge_reference_qa(FakeJudge(["Yes", "no", "Yes."]), "q", "Paris", "Paris").score == 1.0
    assert judge_reference_qa(FakeJudge(["No", "no", "Yes"]), "q", "Paris", "Rome").score == 0.0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_judge_unconfigured_and_unreachable_give_skip_reasons() -> None:
    assert "no judge configured" in str(judge_skip_reason(None))
    assert judge_skip_reason(FakeJudge([])) is None
    url = f"http://127.0.0.1:{closed_port()}"
    judge = OpenAICompatibleJudge(url, "judge-model", timeout=2.0)
    reason = judge_skip_reason(judge)
    assert reason is not None and f"{url}/v1/models" in reason and "unreachable" in reason
    with pytest.raises(UserError, match=f"judge {url}/v1/chat/completions: unreachable"):
        judge_open_ended(judge, "q", "r")
    with pytest.raises(UserError, match="http://"):
        OpenAICompatibleJudge("localhost:8000", "m")


@pytest.fixture
def stub_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local OpenAI-compatible stub on 127.0.0.1 that answers every chat request with n copies of '4'."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "body": body})
            reply = {"choices": [{"message": {"content": "4"}} for _ in range(body["n"])]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/", received
    server.shutdown()
    server.server_close()


def test_openai_compatible_judge_posts_chat_completions(
    stub_server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, received = stub_server
    judge = OpenAICompatibleJudge(url, "judge-model", timeout=5.0)
    result = judge_open_ended(judge, "Say hi", "Hi!")
    assert result.score == pytest.approx(0.8)
    request = received[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "judge-model" and request["body"]["n"] == 3
    assert request["body"]["temperature"] == 0.5 and request["body"]["top_p"] == 0.95
    assert [message["role"] for message in request["body"]["messages"]] == ["system", "user"]


# ---------------------------------------------------------------------------------------------------------------
# Text matching
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The answer is Twenty-One!", "answer is 21"),
        ("one two three", "1 2 3"),
        ("One hundred and five apples", "105 apples"),
        ("Two thousand and twenty-four", "2024"),
        ("1,000 people", "1000 people"),
        ("3.5 km.", "3.5 km"),
        ("Don't panic", "dont panic"),
        ("An apple, a day", "apple day"),
    ],
)
def test_normalise_answer(text: str, normalised: str) -> None:
    assert normalise_answer(text) == normalised


def test_gold_match_whole_words_and_aliases() -> None:
    assert gold_match("No, it is not.", "no")
    assert not gold_match("It is not true.", "no")  # "no" must not match inside "not"
    assert not gold_match("Nobody knows.", "no")
    assert gold_match("It's in the United States.", "USA", aliases=["United States"])
    assert gold_match("There were 3 of them", "three")
    with pytest.raises(UserError, match="empty after normalisation"):
        gold_match("anything", "the", aliases=["?"])


def test_agreement_helpers() -> None:
    assert agrees("Paris.", "paris")
    assert agrees("Twelve", "12")
    assert not agrees("", "")  # two empty answers are failures, not agreement
    assert not agrees("Paris, France", "Paris")
    assert first_k_words_agree("The capital is Paris.", "capital is Paris, of course", k=3)
    assert not first_k_words_agree("Paris", "Paris is big", k=3)
    with pytest.raises(UserError, match="k: must be at least 1"):
        first_k_words_agree("a", "b", k=0)


def test_slot_recall() -> None:
    assert slot_recall("Paris is in France, near Belgium.", ["Paris", "France", "Spain", "Italy"]) == 0.5
    assert slot_recall("anything", []) is None
    assert slot_recall("anything", ["the"]) is None
