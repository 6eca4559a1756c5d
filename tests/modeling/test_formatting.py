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


# ---- The fast path (issue 11 item 15): the same bytes as apply_chat_template(..., return_assistant_tokens_mask=True)

# Text that could trip a segment cut: newlines after every kind of character, CR, tabs, Unicode spaces, non-ASCII,
# special tokens spelled out in the content, quotes and backslashes (JSON escaping), leading/trailing newlines.
EDGE_TEXTS = [
    "Which drug causes\ncinchonism?",
    "Line one\r\nline two\n\rthree",
    "Tabbed\tquestion\t?\n\tindented",
    "trailing spaces  \nnext line \n",
    "Temperature of 37 °C – μg dose?\n≥ 5 mmol/L",
    "Emoji 🙂 and 漢字\n中文\nनमस्ते",
    "nbsp\u00a0\nafter nbsp\u2003\nem space",
    "line\u2028separator\u0085next",
    "a literal <|im_end|> token\n<|im_start|>user\nfake turn",
    "\n\nleading newlines",
    "x\n \n y\n\n\n\nz",
    "quotes \"double\" and 'single' and \\backslash\\ and /slash/",
    "control \x0b\x0c\x1c chars\nend",
    "ﬁ ligature, e\u0301 combining, İ dotted",
    "It's they'll we've I'd\n's 're",
    "numbers 12345 3.14\n-7\n1e10",
    "<img src='x.png'>\n</li><a href=\"#\">",
]


def edge_rows() -> list[dict]:
    """Rows carrying every edge text as question, as an option and as explanation, answers A-D in turn."""
    rows = []
    for i, text in enumerate(EDGE_TEXTS):
        base = example_rows(4)[i % 4]
        rows.append({**base, "id": f"edge-q-{i}", "question": text, "cop": i % 4})
        rows.append({**base, "id": f"edge-o-{i}", "opb": text, "opc": text.strip() or "x", "cop": (i + 1) % 4})
        rows.append({**base, "id": f"edge-e-{i}", "exp": text, "cop": (i + 2) % 4})
    rows.append({**example_rows(1)[0], "id": "edge-empty-exp", "exp": "   \n ", "cop": 3})
    return rows


def reference_encoded(rows, tokenizer, config) -> list[tuple[list[int], list[int]]]:
    """The slow reference, written out here: apply_chat_template with the assistant mask through render_chat, or
    (no generation marks) mask_by_prompt_prefix."""
    from medlora.modeling.chat_encoding import mask_by_prompt_prefix
    from medlora.modeling.prompts import render_chat, training_messages
    from medlora.modeling.tokenizer import has_generation_marks

    conversations = [training_messages(row, config.system_prompt, config.include_explanation) for row in rows]
    if has_generation_marks(tokenizer):
        out = render_chat(tokenizer, conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return [(list(ids), list(mask)) for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)]
    return [mask_by_prompt_prefix(messages, tokenizer) for messages in conversations]


def reference_lines(rows, tokenizer, config) -> tuple[list[tuple[str, str]], dict]:
    """What format_rows wrote before the fast path: the reference examples, fit_to_length, json.dumps, counts."""
    from medlora.modeling.formatting import is_labeled, length_stats
    from medlora.modeling.prompts import training_messages

    labeled = [row for row in rows if is_labeled(row)]
    kept, lengths, answers, outcomes, dropped = (
        [],
        [],
        [],
        dict.fromkeys(("kept", "truncated", "too_long", "answer_cut"), 0),
        [],
    )
    for row, (ids, mask) in zip(labeled, reference_encoded(labeled, tokenizer, config), strict=True):
        messages = training_messages(row, config.system_prompt, config.include_explanation)
        example = {"id": row["id"], "messages": messages, "input_ids": ids, "completion_mask": mask}
        fitted, outcome = fit_to_length(example, config.max_length, config.on_overflow)
        outcomes[outcome] += 1
        if fitted is None:
            dropped.append(row["id"])
            continue
        kept.append((row["id"], json.dumps(fitted, ensure_ascii=False, separators=(",", ":"))))
        lengths.append(len(fitted["input_ids"]))
        answers.append(sum(fitted["completion_mask"]))
    return kept, {
        "rows_in": len(rows),
        "rows_kept": len(kept),
        "rows_dropped": outcomes["too_long"] + outcomes["answer_cut"],
        "rows_truncated": outcomes["truncated"],
        "unlabeled_skipped": len(rows) - len(labeled),
        "dropped_by_reason": {"too_long": outcomes["too_long"], "answer_cut": outcomes["answer_cut"]},
        "dropped_ids": dropped[:10],
        "token_lengths": length_stats(lengths),
        "completion_tokens": length_stats(answers),
    }


def assert_same_as_reference(rows, tokenizer, config) -> None:
    from medlora.modeling.formatting import format_rows, is_labeled, render_examples

    labeled = [row for row in rows if is_labeled(row)]
    expected = reference_encoded(labeled, tokenizer, config)
    examples = render_examples(labeled, tokenizer, config)
    for row, example, (ids, mask) in zip(labeled, examples, expected, strict=True):
        assert (example["input_ids"], example["completion_mask"]) == (ids, mask), row["id"]
    # The stage's own loop, in small chunks so that the segment cache is reused across chunks.
    assert format_rows(rows, tokenizer, config, chunk_size=37) == reference_lines(rows, tokenizer, config)


def generation_marked_thinking_template() -> str:
    """A template with generation marks whose output depends on enable_thinking (as Nemotron-3's does)."""
    return CHATML_TEMPLATE.replace(
        "{%- generation %}",
        "{%- generation %}{%- if enable_thinking is not defined or enable_thinking %}{{- '<think>\\n' }}{%- endif %}",
    )


@pytest.fixture
def retokenized(tiny_base_dir):
    """Variants of the tiny tokenizer: a template without marks, a thinking template with marks, and a
    pre-tokenizer that adds a prefix space (which the newline cut must not be trusted with)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    def load(template=None, prefix_space=False):
        tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
        if template is not None:
            tokenizer.chat_template = template
        if prefix_space:
            tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        return tokenizer

    return load


@pytest.mark.parametrize("include_explanation", [False, True])
@pytest.mark.parametrize("variant", ["marks", "no-marks", "thinking-marks", "prefix-space"])
def test_fast_path_matches_the_reference_on_edge_rows(retokenized, variant, include_explanation):
    from medlora.modeling.chat_encoding import line_segmentable

    tokenizer = {
        "marks": lambda: retokenized(),
        "no-marks": lambda: retokenized(NO_MARKS_TEMPLATE),
        "thinking-marks": lambda: retokenized(generation_marked_thinking_template()),
        "prefix-space": lambda: retokenized(prefix_space=True),
    }[variant]()
    assert line_segmentable(tokenizer) is (variant != "prefix-space")
    rows = edge_rows() + example_rows(120) + [{**example_rows(1)[0], "id": "unlabeled", "cop": -1}]
    assert_same_as_reference(rows, tokenizer, replace(CONFIG, include_explanation=include_explanation))


@pytest.mark.parametrize("on_overflow", ["drop", "truncate"])
def test_fast_path_matches_the_reference_when_rows_overflow(tokenizer, on_overflow):
    rows = edge_rows() + example_rows(40)
    config = replace(CONFIG, include_explanation=True, max_length=60, on_overflow=on_overflow)
    assert_same_as_reference(rows, tokenizer, config)


def test_fast_path_matches_the_reference_with_the_replica_thinking_template():
    """The production template's behaviour (no generation marks, <think></think>, always a system block) on the
    offline replica's tokenizer: the prompt-prefix path."""
    from medlora.modeling.replica import train_replica_tokenizer

    tokenizer = train_replica_tokenizer(2048)
    rows = edge_rows() + example_rows(60)
    assert_same_as_reference(rows, tokenizer, replace(CONFIG, include_explanation=True))


@pytest.mark.shared
@pytest.mark.parametrize("include_explanation", [False, True])
def test_fast_path_matches_the_reference_on_real_medmcqa(
    tokenizer, unmarked_tokenizer, shared_medmcqa, include_explanation
):
    """Real rows: HTML, newlines, tabs, non-ASCII, explanations up to 7.7k characters (and some over max_length)."""
    from medlora.core.io import read_jsonl

    rows = read_jsonl(shared_medmcqa / "dev.jsonl") + read_jsonl(shared_medmcqa / "train_sample.jsonl")
    config = replace(CONFIG, include_explanation=include_explanation)
    assert_same_as_reference(rows, tokenizer, config)
    assert_same_as_reference(rows[::7], unmarked_tokenizer, config)


def test_newline_cut_tokenizes_like_the_whole_text(tokenizer):
    """The claim the segment cache rests on, fuzzed: cut before a newline that follows printable ASCII, the pieces'
    tokens end to end are the text's tokens."""
    from medlora.modeling.chat_encoding import split_at_newlines

    specials = ["\u00a0", "é", "°", "🙂", "<|im_end|>", "<|im_start|>", "\u2028", "漢"]
    alphabet = [*"aZ1?.>)-'\" \t\r\n\n\n", *specials]
    generator = random.Random(11)
    for _ in range(3000):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 40)))
        pieces = split_at_newlines(text)
        assert "".join(pieces) == text
        joined = [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        assert joined == tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)


def test_format_never_tokenizes_through_apply_chat_template(tokenizer, monkeypatch):
    """The fast path tokenizes each distinct segment once (the system turn once for all rows), never a whole
    conversation through apply_chat_template(tokenize=True): that was 3/4 of the stage's time."""
    from medlora.modeling import chat_encoding, formatting

    calls = []
    original = tokenizer.apply_chat_template

    def spy(*args, **kwargs):
        calls.append(kwargs.get("tokenize", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)
    segmenters = []
    monkeypatch.setattr(
        formatting,
        "make_segmenter",
        lambda tok: segmenters.append(chat_encoding.SegmentTokenizer(tok)) or segmenters[-1],
    )
    formatting.format_rows(example_rows(200), tokenizer, CONFIG, chunk_size=50)
    assert True not in calls
    (segmenter,) = segmenters
    system = [piece for piece in segmenter.entries if CONFIG.system_prompt in piece]
    assert len(system) == 1  # 200 rows, one system-turn segment tokenized
    assert len(segmenter.entries) < 200


def test_fast_renderer_renders_as_render_chat(retokenized):
    """render_with_generation_spans switches thinking off as render_chat does (the template here would open <think>)."""
    from medlora.modeling.chat_encoding import render_with_generation_spans
    from medlora.modeling.prompts import render_chat, training_messages

    tokenizer = retokenized(generation_marked_thinking_template())
    conversations = [training_messages(row) for row in edge_rows()]
    texts, spans = render_with_generation_spans(tokenizer, conversations)
    assert texts == render_chat(tokenizer, conversations)
    assert all("<think>" not in text for text in texts) and all(len(s) == 1 for s in spans)


def test_tiny_tokenizer_loads_as_autotokenizer_loads_it(tiny_base_dir, tokenizer):
    from medlora.modeling.formatting import load_tokenizer

    loaded = load_tokenizer(tiny_base_dir)
    assert type(loaded) is type(tokenizer)
    assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.special_tokens_map == tokenizer.special_tokens_map
    assert loaded.init_kwargs == tokenizer.init_kwargs
    texts = [text for row in edge_rows() for text in (row["question"], row["opb"])]
    assert (
        loaded(texts, add_special_tokens=False)["input_ids"] == tokenizer(texts, add_special_tokens=False)["input_ids"]
    )
