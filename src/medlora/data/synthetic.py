"""A deterministic, MedMCQA-shaped dataset written from the fact table in `medlora.data.facts`.

Same seed and sizes -> the same bytes on every machine: one `random.Random(seed)` drives every choice, the
table is iterated in its written order, and nothing depends on `hash()` or set order. That is what lets a fresh
clone regenerate the snapshot and match the md5 that `data.dvc` records.

Questions. Each fact is asked in both directions (value given key, key given value) with several templates;
the three distractors are other facts' values (or keys) of the same relation, and the correct letter is
uniformly random. Held-out facts (every `HOLDOUT_EVERY`-th of a relation) and held-out templates (the last of
each direction) are asked only in validation and test, so no validation or test question text occurs in train.
Validation and test draw from disjoint (fact, template) pairs while there are enough of them.

The mess MedMCQA carries is reproduced on purpose: `exp` null in about 45% of labeled rows, `choice_type`
"multi" on some templates (and on a few others at random, as MedMCQA's labels are noisy), non-ASCII (–, °, μ,
α, β, ü), newlines inside some questions, `topic_name` usually null, and explanations where the letters "rt"
went missing ("aery" for "artery"). The test split is unlabeled like the hub's: `cop` -1 and `exp` "".
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

from medlora.core.contracts import COLUMNS, LETTERS, UNLABELED_COP
from medlora.data.facts import RELATIONS, Multi, Relation

log = logging.getLogger(__name__)

GENERATOR_VERSION = "medlora-synthetic/1"  # bump when the generator or fact table changes the bytes
HOLDOUT_EVERY = 6  # facts at index 5, 11, 17, ... of each relation are asked only in validation/test
EXP_NULL_RATE = 0.45
TOPIC_RATE = 0.15
CHOICE_TYPE_NOISE = 0.05
DROPPED_RT_RATE = 0.08


@dataclass(frozen=True)
class Item:
    """One (relation, fact, template) combination: a question text with its right answer and distractor pool."""

    relation: Relation
    fact_index: int
    template: str
    reverse: bool

    @property
    def fact(self) -> tuple[str, ...]:
        return self.relation.facts[self.fact_index]

    def question(self) -> str:
        key, value = self.fact[0], self.fact[1]
        return self.template.format(key=key, value=value, value_lc=lower_first(value))

    def answer(self) -> str:
        return self.fact[0] if self.reverse else self.fact[1]

    def pool(self) -> list[str]:
        """The same relation's other answers of the same kind (keys for reverse, values for forward)."""
        position = 0 if self.reverse else 1
        return [fact[position] for i, fact in enumerate(self.relation.facts) if i != self.fact_index]

    def subject_name(self) -> str:
        return self.fact[2] if len(self.fact) > 2 else self.relation.subject_name


def lower_first(text: str) -> str:
    """'Night blindness' -> 'night blindness'; acronyms and symbols ('CD30', 'α-fetoprotein') stay as they are."""
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def is_held_out_fact(fact_index: int) -> bool:
    return fact_index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def build_items() -> tuple[list[Item], list[Item]]:
    """All (fact, template) items, split into (train items, evaluation-only items), in table order."""
    train: list[Item] = []
    held_out: list[Item] = []
    for relation in RELATIONS:
        for fact_index in range(len(relation.facts)):
            for reverse, templates in ((False, relation.forward), (True, relation.reverse)):
                for t, template in enumerate(templates):
                    item = Item(relation, fact_index, template, reverse)
                    eval_only = is_held_out_fact(fact_index) or t == len(templates) - 1
                    (held_out if eval_only else train).append(item)
    return train, held_out


def cycle(items: list[Item], size: int, rng: random.Random) -> list[Item]:
    """`size` items: whole shuffled passes over `items`, so every item is used before any repeats."""
    if size and not items:
        raise ValueError(f"cannot draw {size} rows from an empty pool of questions")
    chosen: list[Item] = []
    while len(chosen) < size:
        shuffled = list(items)
        rng.shuffle(shuffled)
        chosen.extend(shuffled[: size - len(chosen)])
    return chosen


def explanation(item: Item, cop: int, rng: random.Random) -> str | None:
    """MedMCQA-style explanation text, or None (as MedMCQA's `exp` often is)."""
    if rng.random() < EXP_NULL_RATE:
        return None
    key, value = item.fact[0], item.fact[1]
    body = item.relation.explanation.format(key=key, value=value, value_lc=lower_first(value))
    answer = item.answer()
    opening = rng.choice(
        (
            f"Ans. is '{LETTERS[cop].lower()}' i.e., {answer}",
            f"Answer- {LETTERS[cop]}. {answer}",
            f"Ans: {LETTERS[cop]}. {answer}",
        )
    )
    text = f"{opening}\n{body} Ref: {item.relation.reference}" if rng.random() < 0.5 else f"{opening} {body}"
    if rng.random() < DROPPED_RT_RATE:
        # The source lost the letters "rt" in many words ("aery" for "artery"); keep that quirk.
        text = text.replace("rt", "")
    return text


def make_row(item: Item, labeled: bool, rng: random.Random) -> dict[str, Any]:
    """One hub-schema row for `item`: distractors from the same relation, the right answer at a random letter."""
    options = rng.sample(item.pool(), 3)
    cop = rng.randrange(len(LETTERS))
    options.insert(cop, item.answer())
    choice_type = "multi" if isinstance(item.template, Multi) else "single"
    if rng.random() < CHOICE_TYPE_NOISE:
        choice_type = "single" if choice_type == "multi" else "multi"
    exp = explanation(item, cop, rng)
    topic = item.relation.topic_name if rng.random() < TOPIC_RATE else None
    row = {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "question": item.question(),
        "opa": options[0],
        "opb": options[1],
        "opc": options[2],
        "opd": options[3],
        "cop": cop if labeled else UNLABELED_COP,
        "choice_type": choice_type,
        "exp": exp if labeled else "",
        "subject_name": item.subject_name(),
        "topic_name": topic if labeled else None,
    }
    return {column: row[column] for column in COLUMNS}


def generate_splits(seed: int, train_size: int, validation_size: int, test_size: int) -> dict[str, list[dict]]:
    """The three splits, deterministic in (seed, sizes, GENERATOR_VERSION); test rows are unlabeled.

    Raises ValueError for a negative size.
    """
    if min(train_size, validation_size, test_size) < 0:
        raise ValueError(f"split sizes must be >= 0, got {train_size}/{validation_size}/{test_size}")
    rng = random.Random(seed)
    train_items, eval_items = build_items()
    eval_items = list(eval_items)
    rng.shuffle(eval_items)
    # Disjoint pools for validation and test, in proportion to their sizes; each cycles inside its own pool.
    if validation_size == 0:
        cut = 0
    elif test_size == 0:
        cut = len(eval_items)
    else:
        share = round(len(eval_items) * validation_size / (validation_size + test_size))
        cut = min(max(share, 1), len(eval_items) - 1)
    plan = {
        "train": (cycle(train_items, train_size, rng), True),
        "validation": (cycle(eval_items[:cut], validation_size, rng), True),
        "test": (cycle(eval_items[cut:], test_size, rng), False),
    }
    splits = {}
    for split, (items, labeled) in plan.items():
        splits[split] = [make_row(item, labeled, rng) for item in items]
        log.info(
            "synthetic %s: %d rows from %d distinct questions", split, len(items), len({i.question() for i in items})
        )
    return splits
