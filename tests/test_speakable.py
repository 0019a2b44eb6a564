"""make_speakable: what TTS will read, or why it cannot be read (prepare stage 2)."""

from __future__ import annotations

import pytest

from cmkd.data.speakable import (
    SpeakableLimits,
    decimal_to_words,
    fraction_to_words,
    make_speakable,
    number_to_words,
    ordinal_to_words,
    year_to_words,
)
from cmkd.errors import UserError

NORMALISED = [
    ("What is 42 plus 7?", "What is forty-two plus seven?"),
    ("It is 3.14 meters.", "It is three point one four meters."),
    ("He came 1st and she came 22nd.", "He came first and she came twenty-second."),
    ("In 1984 the book was written.", "In nineteen eighty-four the book was written."),
    ("It happened in 2005.", "It happened in two thousand five."),
    ("The 1990s were fun.", "The nineteen nineties were fun."),
    ("It weighs 5 kg.", "It weighs five kilograms."),
    ("It is 1 km away.", "It is one kilometer away."),
    ("Runs at 60 mph.", "Runs at sixty miles per hour."),
    ("Prices rose 50%.", "Prices rose fifty percent."),
    ("It costs $3.50.", "It costs three dollars and fifty cents."),
    ("It costs $1.", "It costs one dollar."),
    ("It costs €20.", "It costs twenty euros."),
    ("A budget of $2.5 million.", "A budget of two point five million dollars."),
    ("It was 25°C today.", "It was twenty-five degrees Celsius today."),
    ("It was -5°C.", "It was minus five degrees Celsius."),
    ("Salt & pepper", "Salt and pepper"),
    ("2 + 3 = 5", "two plus three equals five"),
    ("What is 6 / 3?", "What is six divided by three?"),
    ("What is 7 × 8?", "What is seven times eight?"),
    ("What is 10-3?", "What is ten minus three?"),
    ("Read pages 5-10.", "Read pages five to ten."),
    ("From 1990-2000.", "From nineteen ninety to two thousand."),
    ("Is 5 > 3?", "Is five greater than three?"),
    ("What is 2^3?", "What is two to the power of three?"),
    ("Use fruit, e.g. apples, i.e. red ones.", "Use fruit, for example apples, that is red ones."),
    ("Dr. Smith met Mr. Jones.", "Doctor Smith met Mister Jones."),
    ("Apples, pears, etc.", "Apples, pears, et cetera."),
    ("Meet at 3:30 pm.", "Meet at three thirty p m."),
    ("Meet at 10:00.", "Meet at ten o'clock."),
    ("Drink H2O.", "Drink H two O."),
    (
        "Population 1,234,567.",
        "Population one million two hundred thirty-four thousand five hundred sixty-seven.",
    ),
    ("It is 3/4 full.", "It is three quarters full."),
    ("Agent 007.", "Agent zero zero seven."),
    ("Team #1 won.", "Team number one won."),
    ("It is **very** important.", "It is very important."),
    ("Call me “now” — please.", 'Call me "now", please.'),
    ("Hello 🎉 world!", "Hello world!"),
    ("# Title\n- first item\n- second item", "Title. first item. second item"),
    ("What is the capital of France?", "What is the capital of France?"),
    ("Born 3 March 1990.", "Born three March nineteen ninety."),
    ("In the year 1066, who won?", "In the year ten sixty-six, who won?"),
    ("A total of 1999 votes.", "A total of one thousand nine hundred ninety-nine votes."),
    ("Use C++ for speed.", "Use C plus plus for speed."),
    ("The ratio is 2:1.", "The ratio is two to one."),
    ("He is 5'11\" tall.", "He is five feet eleven inches tall."),
    ("Q: What is 5*3? A:", "Q: What is five times three? A:"),
    ("What is 1/3 + 1/4?", "What is one third plus one quarter?"),
    ("It is 98.6°F.", "It is ninety-eight point six degrees Fahrenheit."),
]


@pytest.mark.parametrize(("raw", "spoken"), NORMALISED)
def test_normalisation_table(raw: str, spoken: str) -> None:
    result = make_speakable(raw)
    assert (result.text, result.reject_reason) == (spoken, None)
    assert bool(result.changes) == (raw != spoken)


REJECTED = [
    ("```python\nx = 1\n```", "code block"),
    ("Run `ls -la` here.", "inline code"),
    ("See https://example.org/page now.", "url"),
    ("Visit www.example.com today.", "url"),
    ("Mail me at someone@example.com please.", "email address"),
    ("| a | b |\n|---|---|\n| 1 | 2 |", "markdown table"),
    ("Solve $x^2 = 4$ for x.", "latex"),
    ("What is \\frac{1}{2} of ten?", "latex"),
    ("Make this <b>bold</b> please.", "markup"),
    ("if (a == b) { return; }", "code-like symbols"),
    ("We met on 12/25/2020.", "numeric date"),
    ("日本の首都は何ですか？", "non-latin script"),
    ("🎉🎉🎉", "mostly non-letters"),
    ("???", "empty after cleaning"),
    ("x" * 1200, "too long"),
    (" ".join(["word"] * 150), "too long"),
]


@pytest.mark.parametrize(("raw", "reason"), REJECTED)
def test_rejections_carry_a_reason(raw: str, reason: str) -> None:
    result = make_speakable(raw)
    assert (result.text, result.reject_reason) == (None, reason)
    assert not result.ok and result.detail


def test_limits_are_configurable() -> None:
    text = "one two three four five six"
    assert make_speakable(text, SpeakableLimits(max_words=5)).reject_reason == "too long"
    assert make_speakable(text, SpeakableLimits(max_chars=10)).reject_reason == "too long"
    assert make_speakable(text, SpeakableLimits(max_words=6)).text == text


def test_non_text_is_a_user_error() -> None:
    with pytest.raises(UserError, match="text: must be a string"):
        make_speakable(42)  # type: ignore[arg-type]


def test_changes_name_each_rewrite() -> None:
    assert make_speakable("It weighs 5 kg.").changes == ["'5 kg' -> 'five kilograms'"]


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety-nine"),
        (105, "one hundred five"),
        (1000, "one thousand"),
        (2_000_021, "two million twenty-one"),
        (-8, "minus eight"),
    ],
)
def test_number_to_words(number: int, words: str) -> None:
    assert number_to_words(number) == words


def test_other_spellers() -> None:
    assert [ordinal_to_words(n) for n in (1, 2, 3, 5, 12, 20, 21, 100)] == [
        "first", "second", "third", "fifth", "twelfth", "twentieth", "twenty-first", "one hundredth",
    ]  # fmt: skip
    assert [year_to_words(y) for y in (1905, 1900, 2000, 2010, 1066)] == [
        "nineteen oh five", "nineteen hundred", "two thousand", "twenty ten", "ten sixty-six",
    ]  # fmt: skip
    assert decimal_to_words("0.05") == "zero point zero five"
    assert [fraction_to_words(*f) for f in ((1, 2), (2, 3), (5, 8), (7, 16))] == [
        "one half", "two thirds", "five eighths", "seven over sixteen",
    ]  # fmt: skip
