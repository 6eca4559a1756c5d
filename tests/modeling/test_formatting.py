"""The `format` stage: the loss mask, overflow handling, the early-stopping slice, and tokenization parity with
what evaluation scores (context + correct choice must tokenize exactly like the training example)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import example_rows
from medlora.core.config import FormatConfig
from medlora.core.io import write_jsonl
from medlora.modeling.formatting import (
    EARLY_STOP_FILE,
    TRAIN_FILE,
    FormatError,
    fit_to_length,
    format_training_data,
    render_example,
)
from medlora.modeling.prompts import ANSWER_PREFIX, answer_choices, scoring_context
from medlora.modeling.tokenizer import CHATML_TEMPLATE

CONFIG = FormatConfig()
NO_MARKS_TEMPLATE = CHATML_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture
def unmarked_tokenizer(tiny_base_dir):
    """The same tokenizer with a template that has no {% generation %} marks, as many hub models ship."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    tokenizer.chat_template = NO_MARKS_TEMPLATE
    return tokenizer


def loss_text(tokenizer, example) -> str:
    ids = [i for i, m in zip(example["input_ids"], example["completion_mask"], strict=True) if m]
    return tokenizer.decode(ids)


def test_mask_covers_exactly_the_assistant_turn(tokenizer):
    row = example_rows(2)[1]  # cop 1: B
    example = render_example(row, tokenizer, CONFIG)
    assert set(example) == {"id", "messages", "input_ids", "completion_mask"}
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert loss_text(tokenizer, example) == f"The correct answer is B) {row['opb']}.<|im_end|>"
    mask = example["completion_mask"]
    first, last = mask.index(1), len(mask) - 1 - mask[::-1].index(1)
    assert all(mask[first : last + 1])  # one contiguous span
    assert tokenizer.decode(example["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(example["input_ids"][last + 1 :]) == "\n"  # the newline after end-of-turn: no loss


def test_explanation_is_in_the_loss_when_asked_for(tokenizer):
    row = example_rows(2)[1]
    example = render_example(row, tokenizer, replace(CONFIG, include_explanation=True))
    assert loss_text(tokenizer, example).endswith(f".\n\nExplanation: {row['exp']}<|im_end|>")


def test_template_without_generation_marks_gives_the_same_mask(tokenizer, unmarked_tokenizer):
    for row in example_rows(8):
        marked = render_example(row, tokenizer, CONFIG)
        unmarked = render_example(row, unmarked_tokenizer, CONFIG)
        assert unmarked["input_ids"] == marked["input_ids"]
        assert unmarked["completion_mask"] == marked["completion_mask"]


def test_template_whose_prompt_is_not_a_prefix_is_refused(unmarked_tokenizer):
    unmarked_tokenizer.chat_template = NO_MARKS_TEMPLATE.replace(
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}",
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>' }}",
    )
    with pytest.raises(FormatError, match=r"row .fixture-0000.: .* not a token prefix of the conversation"):
        render_example(example_rows(1)[0], unmarked_tokenizer, CONFIG)


def test_unlabeled_row_cannot_be_rendered(tokenizer):
    row = {**example_rows(1)[0], "cop": -1}
    with pytest.raises(ValueError, match="not a labeled answer"):
        render_example(row, tokenizer, CONFIG)


@pytest.mark.parametrize("include_explanation", [False, True])
def test_context_plus_correct_choice_tokenizes_as_the_training_example(tokenizer, include_explanation):
    """THE parity the evaluation issue demands: T(context + correct choice) is a prefix of the training ids, and
    the context ends on a token boundary, so every one of the four choices is scored from the same context."""
    config = replace(CONFIG, include_explanation=include_explanation)
    for row in example_rows(40):
        example = render_example(row, tokenizer, config)
        context = scoring_context(tokenizer, row, config.system_prompt)
        assert context.endswith(ANSWER_PREFIX) and context == context.rstrip()  # nothing for lm-eval to move
        correct = answer_choices(row)[row["cop"]]
        ids = tokenizer(context + correct, add_special_tokens=False)["input_ids"]
        assert example["input_ids"][: len(ids)] == ids, row["id"]
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        assert ids[: len(context_ids)] == context_ids
        assert tokenizer.decode(ids[len(context_ids) :]) == correct
        assert all(example["completion_mask"][len(context_ids) : len(ids)])  # the choice is trained on


def test_lm_eval_splits_context_and_choice_where_training_does(tokenizer, tiny_base_dir):
    """The real harness's encoding (HFLM._encode_pair) of context + each choice against the training ids."""
    from lm_eval.models.huggingface import HFLM

    from medlora.modeling.base_model import load_base_model

    model, _ = load_base_model(tiny_base_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    for row in example_rows(12):
        example = render_example(row, tokenizer, CONFIG)
        context = scoring_context(tokenizer, row, CONFIG.system_prompt)
        encoded = {choice: lm._encode_pair(context, choice) for choice in answer_choices(row)}
        context_encs = {tuple(context_enc) for context_enc, _ in encoded.values()}
        assert len(context_encs) == 1  # one context for the four choices
        context_enc, continuation_enc = encoded[answer_choices(row)[row["cop"]]]
        assert context_enc + continuation_enc == example["input_ids"][: len(context_enc) + len(continuation_enc)]


def test_fit_to_length_drops_truncates_and_counts_a_cut_answer(tokenizer):
    example = render_example(example_rows(1)[0], tokenizer, CONFIG)
    length, answer_start = len(example["input_ids"]), example["completion_mask"].index(1)
    assert fit_to_length(example, length, "drop") == (example, "kept")
    assert fit_to_length(example, length - 1, "drop") == (None, "too_long")
    truncated, outcome = fit_to_length(example, answer_start + 2, "truncate")
    assert outcome == "truncated" and len(truncated["input_ids"]) == answer_start + 2
    assert truncated["completion_mask"][answer_start:] == [1, 1]
    assert fit_to_length(example, answer_start, "truncate") == (None, "answer_cut")


def make_validated(tmp_path: Path) -> tuple[Path, list[dict], list[dict]]:
    """A validated dir: train with labeled, unlabeled and over-long rows; validation with its own ids."""
    train = example_rows(60)
    for row in train[:3]:
        row["cop"] = -1
    for row in train[3:6]:
        row["question"] = "Which drug causes " + "severe " * 120 + "tremor?"
    validation = [{**row, "id": f"validation-{i:04d}"} for i, row in enumerate(example_rows(20))]
    validated = tmp_path / "validated"
    write_jsonl(validated / "train.jsonl", train)
    write_jsonl(validated / "validation.jsonl", validation)
    return validated, train, validation


def read_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("on_overflow", ["drop", "truncate"])
def test_stage_counts_conserve_and_overflow_is_never_silent(tmp_path, tiny_base_dir, tokenizer, on_overflow):
    validated, train, _ = make_validated(tmp_path)
    config = replace(CONFIG, max_length=128, on_overflow=on_overflow, early_stopping_size=10)
    report = format_training_data(validated / "train.jsonl", tiny_base_dir, tmp_path / "formatted", config)
    assert report.rows_in == len(train) == 60
    assert report.unlabeled_skipped == 3
    assert report.rows_in == report.rows_kept + report.rows_dropped + report.unlabeled_skipped
    assert report.train_rows + report.early_stop_rows == report.rows_kept
    if on_overflow == "drop":
        assert (report.rows_dropped, report.rows_truncated) == (3, 0)
        assert report.dropped_by_reason["too_long"] == 3
        assert sorted(report.dropped_ids) == [row["id"] for row in train[3:6]]
    else:  # the long question pushes the whole answer past 128 tokens: dropped and counted, not trained empty
        assert (report.dropped_by_reason["answer_cut"], report.rows_truncated) == (3, 0)
    assert report.token_lengths["max"] <= 128
    assert report.token_lengths["min"] <= report.token_lengths["p50"] <= report.token_lengths["p99"]
    out = tmp_path / "formatted"
    assert len(read_ids(out / TRAIN_FILE)) == report.train_rows
    assert len(read_ids(out / EARLY_STOP_FILE)) == report.early_stop_rows == 10
    assert not (tmp_path / "formatted.partial").exists()
    written = [json.loads(line) for line in (out / TRAIN_FILE).open(encoding="utf-8")]
    by_id = {row["id"]: row for row in train}
    for example in written[:5]:  # the stage renders in batches: the same ids and masks as one row at a time
        assert example == render_example(by_id[example["id"]], tokenizer, config)


def test_truncate_keeps_part_of_the_answer(tmp_path, tiny_base_dir, tokenizer):
    validated, train, _ = make_validated(tmp_path)
    long_row = train[3]
    answer_start = render_example(long_row, tokenizer, CONFIG)["completion_mask"].index(1)
    config = replace(CONFIG, max_length=answer_start + 3, on_overflow="truncate", early_stopping_size=0)
    report = format_training_data(validated / "train.jsonl", tiny_base_dir, tmp_path / "formatted", config)
    assert report.rows_truncated >= 3 and report.rows_dropped == 0
    rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "formatted" / TRAIN_FILE).open()}
    kept = rows[long_row["id"]]
    assert len(kept["input_ids"]) == answer_start + 3 and sum(kept["completion_mask"]) == 3


def test_early_stop_slice_is_carved_from_train_deterministically(tmp_path, tiny_base_dir):
    validated, train, validation = make_validated(tmp_path)
    config = replace(CONFIG, early_stopping_size=12)
    format_training_data(validated / "train.jsonl", tiny_base_dir, tmp_path / "a", config)
    early, rest = read_ids(tmp_path / "a" / EARLY_STOP_FILE), read_ids(tmp_path / "a" / TRAIN_FILE)
    assert len(early) == 12 and not set(early) & set(rest)
    assert set(early) <= {row["id"] for row in train}
    assert not set(early) & {row["id"] for row in validation}

    shuffled = list(train)
    random.Random(0).shuffle(shuffled)
    write_jsonl(tmp_path / "shuffled" / "train.jsonl", shuffled)
    format_training_data(tmp_path / "shuffled" / "train.jsonl", tiny_base_dir, tmp_path / "b", config)
    assert set(read_ids(tmp_path / "b" / EARLY_STOP_FILE)) == set(early)  # the same rows whatever the order


def test_early_stop_larger_than_train_is_an_error(tmp_path, tiny_base_dir):
    validated, _, _ = make_validated(tmp_path)
    with pytest.raises(ValueError, match="early_stopping_size 500 leaves no training rows"):
        format_training_data(
            validated / "train.jsonl", tiny_base_dir, tmp_path / "out", replace(CONFIG, early_stopping_size=500)
        )
    assert not (tmp_path / "out").exists()
