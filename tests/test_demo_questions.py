"""The built-in demo question set: sizes, split hygiene, learnable slots, determinism."""

from __future__ import annotations

from collections import Counter

import pytest

from cmkd.data.demo_questions import (
    DemoQuestion,
    generate_demo_questions,
    load_demo_questions,
    main,
    matches_gold,
    slot_words,
)
from cmkd.data.speakable import make_speakable
from cmkd.errors import UserError


@pytest.fixture(scope="module")
def questions() -> list[DemoQuestion]:
    return load_demo_questions()


def test_sizes_and_categories(questions: list[DemoQuestion]) -> None:
    splits = Counter(q.split for q in questions)
    assert splits["train"] >= 300 and splits["heldout"] >= 100 and set(splits) == {"train", "heldout"}
    categories = Counter(q.category for q in questions)
    assert len(categories) >= 7 and min(categories.values()) >= 40
    assert len({q.id for q in questions}) == len(questions)
    assert all(q.answer and q.question.endswith(("?", ".")) for q in questions)
    assert load_demo_questions("heldout") == [q for q in questions if q.split == "heldout"]
    with pytest.raises(UserError, match="split"):
        load_demo_questions("test")


def test_heldout_text_never_in_train(questions: list[DemoQuestion]) -> None:
    train = {q.question.lower() for q in questions if q.split == "train"}
    assert not [q.question for q in questions if q.split == "heldout" and q.question.lower() in train]


def test_heldout_pairs_are_new_but_their_slots_are_seen(questions: list[DemoQuestion]) -> None:
    train = [q for q in questions if q.split == "train"]
    seen_values = {(q.category, name, value) for q in train for name, value in q.slots.items()}
    seen_pairs = {(q.category, tuple(sorted(q.slots.items())), q.template) for q in train}
    seen_combos = Counter((q.category, tuple(sorted(q.slots.items()))) for q in train)
    for q in (q for q in questions if q.split == "heldout"):
        assert all((q.category, name, value) in seen_values for name, value in q.slots.items()), q.id
        assert (q.category, tuple(sorted(q.slots.items())), q.template) not in seen_pairs, q.id
        if len(q.slots) > 1:  # multi-slot: the combination itself is new
            assert seen_combos[(q.category, tuple(sorted(q.slots.items())))] == 0, q.id
    new_phrasing = [q for q in questions if q.split == "heldout" and "/heldout-" in q.template]
    assert new_phrasing and not [q for q in train if "/heldout-" in q.template]


def test_single_slot_values_are_trained_several_times(questions: list[DemoQuestion]) -> None:
    counts = Counter(
        (q.category, *q.slots.values()) for q in questions if q.split == "train" and len(q.slots) == 1
    )
    assert min(counts.values()) >= 3
    values_per_category = Counter(category for category, _ in counts)
    assert all(10 <= n <= 40 for n in values_per_category.values())


def test_questions_are_already_speakable(questions: list[DemoQuestion]) -> None:
    assert [q.question for q in questions if make_speakable(q.question).text != q.question] == []
    assert not any(ch.isdigit() for q in questions for ch in q.question)


def test_generation_is_deterministic_and_matches_committed_file(questions: list[DemoQuestion]) -> None:
    assert generate_demo_questions(0) == generate_demo_questions(0) == questions
    assert generate_demo_questions(1) != questions
    assert main(["--check"]) == 0


def test_slot_words_and_gold_matching(questions: list[DemoQuestion]) -> None:
    five_times_four = DemoQuestion("x", "Calculate five times four.", "twenty", ["20"], "arithmetic", "train",
                                   {"a": "five", "op": "times", "b": "four"}, "arithmetic/train-1")  # fmt: skip
    assert slot_words(five_times_four) == ["five", "times", "four"]
    assert slot_words(
        DemoQuestion("y", "", "", [], "repeat", "train", {"a": "Big dogs", "b": "dogs"}, "")
    ) == ["big", "dogs"]
    record = next(q for q in questions if q.category == "capitals").to_record()
    assert slot_words(record) == [record.meta["slots"]["country"].lower()]
    assert matches_gold("Five times four is Twenty.", "twenty", ["20"])
    assert matches_gold("The answer is 20", "twenty", ["20"])
    assert matches_gold("It is fifty six.", "fifty-six")
    assert not matches_gold("It is seventy.", "seven")
    assert not matches_gold("Parisian food", "Paris")
