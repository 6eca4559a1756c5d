"""The synthetic MedMCQA: deterministic bytes, a real fact table, no evaluation question leaking into train."""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys

import pytest

from medlora.core.contracts import COLUMNS, LETTERS
from medlora.data.facts import RELATIONS
from medlora.data.synthetic import build_items, generate_splits, is_held_out_fact
from medlora.data.validation import normalize_question

SIZES = {"seed": 1234, "train_size": 600, "validation_size": 150, "test_size": 60}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return generate_splits(**SIZES)


def digest(splits: dict[str, list[dict]]) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for split in splits.values() for row in split)
    return hashlib.sha256(text.encode()).hexdigest()


def test_fact_table_is_large_and_one_to_one():
    assert sum(len(r.facts) for r in RELATIONS) >= 150
    assert len({r.subject_name for r in RELATIONS}) >= 10
    for relation in RELATIONS:
        keys = [fact[0].casefold() for fact in relation.facts]
        values = [fact[1].casefold() for fact in relation.facts]
        # One-to-one, so the distractors drawn from the same relation can never be a second right answer.
        assert len(set(keys)) == len(keys), relation.name
        assert len(set(values)) == len(values), relation.name
        assert len(relation.forward) >= 3 and len(relation.reverse) >= 3, relation.name
        assert len(relation.facts) >= 4, relation.name  # three distractors need three other facts


def test_same_bytes_in_a_fresh_interpreter_with_another_hash_seed(splits):
    # PYTHONHASHSEED changes str hashing (and set order): the output must not depend on it.
    code = (
        "import hashlib, json; from medlora.data.synthetic import generate_splits; "
        f"s = generate_splits(**{SIZES!r}); "
        "t = ''.join(json.dumps(r, ensure_ascii=False) + '\\n' for v in s.values() for r in v); "
        "print(hashlib.sha256(t.encode()).hexdigest())"
    )
    for hash_seed in ("1", "987"):
        env = {"PYTHONHASHSEED": hash_seed, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == digest(splits)
    assert digest(generate_splits(**{**SIZES, "seed": 1235})) != digest(splits)


def test_rows_have_the_hub_schema_sizes_and_labels(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 600, "validation": 150, "test": 60}
    for split, rows in splits.items():
        for row in rows:
            assert list(row) == list(COLUMNS)
            options = [row["opa"], row["opb"], row["opc"], row["opd"]]
            assert len(set(options)) == 4 and all(options)
            if split == "test":
                assert (row["cop"], row["exp"], row["topic_name"]) == (-1, "", None)
            else:
                assert row["cop"] in range(4)
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(set(ids)) == len(ids)


def test_correct_letter_is_uniform_and_marks_the_facts_answer():
    rows = generate_splits(seed=7, train_size=4000, validation_size=0, test_size=0)["train"]
    counts = collections.Counter(row["cop"] for row in rows)
    assert all(abs(counts[c] / len(rows) - 0.25) < 0.03 for c in range(len(LETTERS)))
    train_items, eval_items = build_items()
    answers = collections.defaultdict(set)
    for item in train_items + eval_items:
        answers[item.question()].add(item.answer())
    assert all(len(a) == 1 for a in answers.values())  # one question text, one right answer
    for row in rows:
        options = [row["opa"], row["opb"], row["opc"], row["opd"]]
        assert answers[row["question"]] == {options[row["cop"]]}


def test_no_validation_or_test_question_occurs_in_train(splits):
    train = {row["question"] for row in splits["train"]}
    train_normalized = {normalize_question(q) for q in train}
    for split in ("validation", "test"):
        for row in splits[split]:
            assert row["question"] not in train
            assert normalize_question(row["question"]) not in train_normalized
    # And over the whole item space, not only the rows this sample drew.
    train_items, eval_items = build_items()
    all_train = {normalize_question(item.question()) for item in train_items}
    assert not all_train & {normalize_question(item.question()) for item in eval_items}
    assert any(not is_held_out_fact(item.fact_index) for item in eval_items)  # held-out templates on known facts
    assert any(is_held_out_fact(item.fact_index) for item in eval_items)  # and held-out facts


def test_validation_and_test_questions_are_disjoint(splits):
    assert not {r["question"] for r in splits["validation"]} & {r["question"] for r in splits["test"]}


def test_carries_medmcqa_mess():
    rows = generate_splits(seed=1234, train_size=2000, validation_size=300, test_size=100)["train"]
    exp_null = sum(row["exp"] is None for row in rows) / len(rows)
    assert 0.3 < exp_null < 0.6
    assert {row["choice_type"] for row in rows} == {"single", "multi"}
    assert sum(row["topic_name"] is None for row in rows) > 0.7 * len(rows)
    assert any("\n" in row["question"] for row in rows)
    text = json.dumps(rows, ensure_ascii=False)
    for character in ("–", "°", "μ", "α", "β"):
        assert character in text, character
    assert len({row["subject_name"] for row in rows}) >= 10


def test_full_size_is_fast_enough():
    import time

    started = time.perf_counter()
    rows = generate_splits(seed=1, train_size=50_000, validation_size=1000, test_size=1000)
    assert len(rows["train"]) == 50_000
    assert time.perf_counter() - started < 5.0
