"""The built-in question set the CPU demo trains and evaluates on (committed as `demo_questions.jsonl`).

Why it looks like this. The CPU probes (research/cpu-feasibility*.md) found that a projector trained for 10-20
minutes on a 2-core CPU learns the question TYPE fast but the slot CONTENT (which country, which number) slowly,
and that the SmolLM2-135M teacher is only reliable on some kinds of question. So the set is built for content
that can be learned and measured in that budget:

- Categories the teacher handles (probe accuracy in brackets): opposites (75%), repeat-the-phrase (76%),
  capitals of well-known countries (52%), plus colours of things, animal sounds and young, yes/no facts and
  small-number arithmetic. Spelling (0%) is left out.
- A closed, small slot vocabulary: 12-20 values per single-slot category, 9 numbers x 3 operations for
  arithmetic, 10 x 10 words for repeat, 18 animals x 5 classes for yes/no. Every single-slot value is seen three
  times in training under three different phrasings; every multi-slot value at least twice.
- The held-out split never has a question text that occurs in training, and every slot value it uses was seen in
  training in the same category and slot. What is new is the PAIRING: a phrasing the value was never trained
  with, or a combination of slot values never trained together (arithmetic, repeat, yes/no). About a third of
  held-out questions use a phrasing that never occurs in training at all (their `template` is marked `heldout`).
  So held-out scores measure whether slot content crosses the speech path, not whether the model knows new
  entities. The held-out split is for measurement only; nothing is tuned on it.
- Short and speakable: numbers are words, no symbols, so the text the teacher reads is exactly what the TTS says
  (`make_speakable` leaves every question unchanged; a test checks it).

Generation is deterministic from a seed. Regenerate the committed file with
`python -m cmkd.data.demo_questions` (add `--check` to verify it is up to date).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cmkd.data.jsonl_io import atomic_write_text
from cmkd.data.records import PairedRecord
from cmkd.data.speakable import number_to_words
from cmkd.errors import UserError

SPLITS = ("train", "heldout")
DATA_FILE = "demo_questions.jsonl"
DEFAULT_SEED = 0


@dataclass
class DemoQuestion:
    """One demo question with its gold answer, lenient aliases and the slot values it was built from."""

    id: str
    question: str
    answer: str
    aliases: list[str]
    category: str
    split: str
    slots: dict[str, str]
    template: str

    def to_record(self) -> PairedRecord:
        """The question as a paired record (no speech yet); split, aliases and slots travel in `meta`."""
        meta = {"source": "demo", "split": self.split, "aliases": self.aliases, "slots": self.slots}
        meta["template"] = self.template
        return PairedRecord(
            id=self.id,
            prompt=self.question,
            target=self.answer,
            task="short_answer",
            category=self.category,
            meta=meta,
        )


@dataclass(frozen=True)
class _Fact:
    """One slot filling with its answer; `fill` holds extra template text (articles) derived from the slots."""

    slots: dict[str, str]
    answer: str
    aliases: tuple[str, ...] = ()
    fill: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Category:
    name: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    facts: tuple[_Fact, ...]
    n_train: int
    n_heldout: int
    min_train_count: int = 3
    answer_quota: tuple[tuple[str, int, int], ...] = ()  # (answer, train count, held-out count)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
    "Austria": "Vienna", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok",
}  # fmt: skip
_OPPOSITES = {
    "hot": ("cold",), "big": ("small", "little"), "fast": ("slow",), "happy": ("sad", "unhappy"),
    "wet": ("dry",), "full": ("empty",), "rich": ("poor",), "early": ("late",), "strong": ("weak",),
    "loud": ("quiet", "soft", "silent"), "thick": ("thin",), "clean": ("dirty", "messy"), "high": ("low",),
    "young": ("old", "elderly"), "open": ("closed", "shut"), "heavy": ("light",), "hard": ("soft", "easy"),
    "good": ("bad", "evil"), "long": ("short",), "near": ("far", "distant"),
}  # fmt: skip
_COLORS = {  # thing -> (phrase in a question, colour, aliases)
    "sky": ("the sky", "blue", ()), "grass": ("grass", "green", ()), "snow": ("snow", "white", ()),
    "banana": ("a banana", "yellow", ()), "coal": ("coal", "black", ()), "tomato": ("a tomato", "red", ()),
    "milk": ("milk", "white", ()), "lemon": ("a lemon", "yellow", ()), "carrot": ("a carrot", "orange", ()),
    "strawberry": ("a strawberry", "red", ()), "crow": ("a crow", "black", ()),
    "chocolate": ("chocolate", "brown", ()), "frog": ("a frog", "green", ()),
    "pumpkin": ("a pumpkin", "orange", ()), "elephant": ("an elephant", "gray", ("grey",)),
    "flamingo": ("a flamingo", "pink", ()),
}  # fmt: skip
_SOUNDS = {
    "dog": ("bark", ("barks", "woof")), "cat": ("meow", ("meows", "miaow", "purr")), "cow": ("moo", ("moos",)),
    "duck": ("quack", ("quacks",)), "sheep": ("baa", ("bleat", "bleats")), "pig": ("oink", ("oinks", "grunt")),
    "horse": ("neigh", ("neighs", "whinny")), "lion": ("roar", ("roars",)), "owl": ("hoot", ("hoots",)),
    "snake": ("hiss", ("hisses",)), "bee": ("buzz", ("buzzes",)), "frog": ("croak", ("croaks", "ribbit")),
}  # fmt: skip
_YOUNG = {
    "dog": ("puppy", ("pup",)), "cat": ("kitten", ("kitty",)), "cow": ("calf", ()), "sheep": ("lamb", ()),
    "horse": ("foal", ("colt", "filly")), "pig": ("piglet", ()), "duck": ("duckling", ()),
    "frog": ("tadpole", ("froglet",)), "lion": ("cub", ()), "kangaroo": ("joey", ()), "chicken": ("chick", ()),
    "goat": ("kid", ()),
}  # fmt: skip
_ANIMAL_CLASS = {
    "dog": "mammal", "cat": "mammal", "horse": "mammal", "whale": "mammal", "bat": "mammal", "cow": "mammal",
    "owl": "bird", "penguin": "bird", "duck": "bird", "eagle": "bird", "shark": "fish", "salmon": "fish",
    "snake": "reptile", "turtle": "reptile", "lizard": "reptile", "bee": "insect", "ant": "insect",
    "butterfly": "insect",
}  # fmt: skip
_NUMBERS = [number_to_words(n) for n in range(1, 10)]
_REPEAT_ADJECTIVES = ("red", "blue", "green", "yellow", "big", "small", "happy", "sleepy", "little", "noisy")
_REPEAT_NOUNS = ("cats", "dogs", "birds", "apples", "boats", "trees", "houses", "flowers", "horses", "books")


def _arithmetic_facts() -> tuple[_Fact, ...]:
    facts = []
    for a in range(1, 10):
        for b in range(1, 10):
            results = {"plus": a + b, "times": a * b, "minus": a - b}
            for op, result in results.items():
                if result > 0:
                    slots = {"a": number_to_words(a), "op": op, "b": number_to_words(b)}
                    facts.append(_Fact(slots, number_to_words(result), (str(result),)))
    return tuple(facts)


def _categories() -> tuple[_Category, ...]:
    yes_no = [
        _Fact({"animal": animal, "class": group}, "yes" if _ANIMAL_CLASS[animal] == group else "no",
              ("true", "correct") if _ANIMAL_CLASS[animal] == group else ("false", "incorrect"),
              {"an_animal": _article(animal), "a_class": _article(group)})
        for animal in _ANIMAL_CLASS for group in ("mammal", "bird", "fish", "reptile", "insect")
    ]  # fmt: skip
    return (
        _Category(
            "capitals",
            ("What is the capital of {country}?", "Which city is the capital of {country}?",
             "Name the capital city of {country}.", "Tell me the capital of {country}.",
             "What city is the capital of {country}?"),
            ("The capital of {country} is which city?",),
            tuple(_Fact({"country": c}, city, ("Peking",) if city == "Beijing" else ()) for c, city in _CAPITALS.items()),
            n_train=60, n_heldout=14,
        ),
        _Category(
            "opposites",
            ("What is the opposite of {word}?", "What is the opposite of the word {word}?",
             "Give me the opposite of {word}.", "Tell me the opposite of {word}.",
             "What word means the opposite of {word}?"),
            ("Which word is the opposite of {word}?",),
            tuple(_Fact({"word": w}, answers[0], answers[1:]) for w, answers in _OPPOSITES.items()),
            n_train=60, n_heldout=14,
        ),
        _Category(
            "colors",
            ("What color is {thing_phrase}?", "What is the color of {thing_phrase}?",
             "Tell me the color of {thing_phrase}.", "Which color is {thing_phrase}?",
             "What color is {thing_phrase} usually?"),
            ("Name the color of {thing_phrase}.",),
            tuple(_Fact({"thing": t}, color, aliases, {"thing_phrase": phrase})
                  for t, (phrase, color, aliases) in _COLORS.items()),
            n_train=48, n_heldout=12,
        ),
        _Category(
            "animal_sounds",
            ("What sound does {an_animal} make?", "What noise does {an_animal} make?", "What does {an_animal} say?",
             "Which sound does {an_animal} make?", "What sound do you hear from {an_animal}?"),
            ("How does {an_animal} sound?",),
            tuple(_Fact({"animal": a}, sound, aliases, {"an_animal": _article(a)})
                  for a, (sound, aliases) in _SOUNDS.items()),
            n_train=36, n_heldout=10,
        ),
        _Category(
            "animal_young",
            ("What is a baby {animal} called?", "What do you call a baby {animal}?",
             "What is the name for a baby {animal}?", "What do we call a young {animal}?",
             "A baby {animal} is called what?"),
            ("What word is used for a baby {animal}?",),
            tuple(_Fact({"animal": a}, young, aliases) for a, (young, aliases) in _YOUNG.items()),
            n_train=36, n_heldout=10,
        ),
        _Category(
            "arithmetic",
            ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?",
             "What does {a} {op} {b} equal?", "Work out {a} {op} {b}."),
            ("Tell me what {a} {op} {b} is.",),
            _arithmetic_facts(), n_train=42, n_heldout=16, min_train_count=2,
        ),
        _Category(
            "yes_no",
            ("Is {an_animal} {a_class}?", "Is it true that {an_animal} is {a_class}?",
             "Would you call {an_animal} {a_class}?", "Answer yes or no: is {an_animal} {a_class}?",
             "Tell me if {an_animal} is {a_class}."),
            ("Yes or no, is {an_animal} {a_class}?",),
            tuple(yes_no), n_train=36, n_heldout=12, min_train_count=2,
            answer_quota=(("yes", 12, 6), ("no", 24, 6)),
        ),
        _Category(
            "repeat",
            ("Repeat after me: {adjective} {noun}.", "Please say the words {adjective} {noun}.",
             "Say this phrase: {adjective} {noun}.", "Repeat the phrase {adjective} {noun}.",
             "Please repeat {adjective} {noun}."),
            ("Say these words back to me: {adjective} {noun}.",),
            tuple(_Fact({"adjective": adj, "noun": noun}, f"{adj} {noun}")
                  for adj in _REPEAT_ADJECTIVES for noun in _REPEAT_NOUNS),
            n_train=40, n_heldout=14,
        ),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def _question(template: str, fact: _Fact) -> str:
    text = template.format(**fact.slots, **fact.fill)
    return text[0].upper() + text[1:]


def _single_slot_split(category: _Category, rng: random.Random) -> list[tuple[str, _Fact, str]]:
    """Each value: `min_train_count` train questions under rotating phrasings; held-out: a phrasing not yet used."""
    order = list(category.facts)
    rng.shuffle(order)
    templates = category.train_templates
    repeats = category.min_train_count
    if repeats >= len(templates) or len(order) * repeats != category.n_train:
        raise AssertionError(f"{category.name}: sizes do not fit the rotation")  # a bug in the tables above
    rows = [
        ("train", fact, f"train-{(i + j) % len(templates)}")
        for i, fact in enumerate(order)
        for j in range(repeats)
    ]
    for k, index in enumerate(sorted(rng.sample(range(len(order)), category.n_heldout))):
        if k % 3 == 2:
            template_id = f"heldout-{k % len(category.heldout_templates)}"
        else:
            template_id = f"train-{(index + repeats) % len(templates)}"
        rows.append(("heldout", order[index], template_id))
    return rows


def _multi_slot_split(category: _Category, rng: random.Random) -> list[tuple[str, _Fact, str]]:
    """Training combinations chosen so every slot value is seen `min_train_count` times; held-out: unseen combos."""
    order = list(category.facts)
    rng.shuffle(order)
    quota_rank = {answer: rank for rank, (answer, _, _) in enumerate(category.answer_quota)}
    order.sort(
        key=lambda fact: quota_rank.get(fact.answer, 0)
    )  # stable: answers listed first fill their quota first
    train_quota = {answer: n for answer, n, _ in category.answer_quota}
    heldout_quota = {answer: n for answer, _, n in category.answer_quota}
    chosen: list[_Fact] = []
    seen = Counter[tuple[str, str]]()

    def fits(fact: _Fact, quota: dict[str, int], taken: list[_Fact]) -> bool:
        return not quota or sum(1 for f in taken if f.answer == fact.answer) < quota.get(fact.answer, 0)

    def deficit(fact: _Fact) -> int:
        return sum(1 for item in fact.slots.items() if seen[item] < category.min_train_count)

    def take(fact: _Fact) -> None:
        chosen.append(fact)
        seen.update(fact.slots.items())

    values = sorted({item for fact in order for item in fact.slots.items()})
    for value in values:
        while seen[value] < category.min_train_count:
            candidates = [
                f
                for f in order
                if f not in chosen and value in f.slots.items() and fits(f, train_quota, chosen)
            ]
            if not candidates:
                raise AssertionError(f"{category.name}: cannot cover {value} in training")
            take(max(candidates, key=deficit))
    for fact in order:
        if len(chosen) >= category.n_train:
            break
        if fact not in chosen and fits(fact, train_quota, chosen):
            take(fact)
    if len(chosen) != category.n_train:
        raise AssertionError(
            f"{category.name}: coverage needs {len(chosen)} training questions, not {category.n_train}"
        )
    heldout: list[_Fact] = []
    for fact in order:
        if len(heldout) < category.n_heldout and fact not in chosen and fits(fact, heldout_quota, heldout):
            heldout.append(fact)
    count = len(category.train_templates)
    rows = [("train", fact, f"train-{i % count}") for i, fact in enumerate(chosen)]
    for k, fact in enumerate(heldout):
        template_id = f"heldout-{k % len(category.heldout_templates)}" if k % 3 == 2 else f"train-{k % count}"
        rows.append(("heldout", fact, template_id))
    return rows


def generate_demo_questions(seed: int = DEFAULT_SEED) -> list[DemoQuestion]:
    """Build the whole set deterministically: train questions first, then held-out, categories in a fixed order."""
    questions: list[DemoQuestion] = []
    for category in _categories():
        rng = random.Random(f"{seed}:{category.name}")  # str seeds hash the same on every run and platform
        single_slot = all(len(fact.slots) == 1 for fact in category.facts)
        rows = _single_slot_split(category, rng) if single_slot else _multi_slot_split(category, rng)
        numbers = Counter[str]()
        for split, fact, template_id in rows:
            kind, index = template_id.split("-")
            templates = category.train_templates if kind == "train" else category.heldout_templates
            numbers[split] += 1
            questions.append(
                DemoQuestion(
                    id=f"demo-{category.name}-{split}-{numbers[split]:03d}",
                    question=_question(templates[int(index)], fact),
                    answer=fact.answer,
                    aliases=list(fact.aliases),
                    category=category.name,
                    split=split,
                    slots=dict(fact.slots),
                    template=f"{category.name}/{template_id}",
                )
            )
    questions.sort(key=lambda q: SPLITS.index(q.split))
    train_texts = {q.question.lower() for q in questions if q.split == "train"}
    clashes = [q.id for q in questions if q.split == "heldout" and q.question.lower() in train_texts]
    if clashes:
        raise AssertionError(f"held-out questions repeat training text: {clashes}")
    return questions


# ---------------------------------------------------------------------------------------------------------------
# Loading, slot words, lenient matching
# ---------------------------------------------------------------------------------------------------------------


def _to_jsonl(questions: Sequence[DemoQuestion]) -> str:
    return "".join(json.dumps(asdict(q), ensure_ascii=False) + "\n" for q in questions)


def load_demo_questions(split: str | None = None) -> list[DemoQuestion]:
    """The committed demo set, optionally one split ('train' or 'heldout')."""
    if split is not None and split not in SPLITS:
        raise UserError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    text = resources.files("cmkd.data").joinpath(DATA_FILE).read_text(encoding="utf-8")
    questions = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        try:
            questions.append(DemoQuestion(**json.loads(line)))
        except (TypeError, ValueError) as err:
            raise UserError(f"{DATA_FILE}:{line_no}: damaged demo file ({err}); reinstall cmkd") from None
    return [q for q in questions if split is None or q.split == split]


def slot_words(record: DemoQuestion | PairedRecord) -> list[str]:
    """Lower-case words of the question's slot values, in order, without repeats: the slot-recall vocabulary.

    E.g. 'Calculate five times four.' -> ['five', 'times', 'four']. Works on a demo question or on a paired
    record built from one (slots in `meta['slots']`); other records have no slots and give [].
    """
    slots: Any = record.slots if isinstance(record, DemoQuestion) else record.meta.get("slots", {})
    words: list[str] = []
    for value in slots.values() if isinstance(slots, dict) else ():
        for word in re.findall(r"[a-z0-9']+", str(value).lower()):
            if word not in words:
                words.append(word)
    return words


def _normalise(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("-", " "))) + " "


def matches_gold(response: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """Lenient gold match: the answer or an alias occurs in the response as whole words (case, punctuation ignored)."""
    normalised = _normalise(response)
    return any(
        _normalise(option).strip() and _normalise(option) in normalised for option in (answer, *aliases)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with --check, verify) the committed JSONL next to this module."""
    parser = argparse.ArgumentParser(description="Regenerate the built-in demo question set.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is out of date")
    args = parser.parse_args(argv)
    path = Path(__file__).with_name(DATA_FILE)
    content = _to_jsonl(generate_demo_questions(args.seed))
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        print("up to date" if current == content else f"{path} is out of date")
        return 0 if current == content else 1
    atomic_write_text(path, content)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
