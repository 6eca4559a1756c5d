"""The `format` stage's verb: validated train rows -> token ids through the base tokenizer's chat template.

Each labeled row becomes `{"id", "messages", "input_ids", "completion_mask"}`: the seed's system/user/assistant
conversation, tokenized exactly as `apply_chat_template` renders it, with `completion_mask` 1 on the assistant
turn's tokens (its end-of-turn token included) and 0 elsewhere, so TRL's SFTTrainer puts the loss on the answer
only. Evaluation gives lm-eval `scoring_context(row)` + one of the four answers; that text tokenizes into a
prefix of the training example (a test holds it), so what evaluation scores is what training taught.

Rows longer than `format.max_length` are dropped or truncated by param and always counted. The early-stopping
slice is carved from train (never from validation) by a hash of each row's id: the same rows whatever the order.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from medlora.core.config import FormatConfig, Params
from medlora.core.contracts import COLUMNS, LETTERS, FormatReport
from medlora.core.io import atomic_directory, read_json, read_jsonl
from medlora.modeling.base_model import BASE_REFERENCE_FILE
from medlora.modeling.chat_encoding import FormatError, encode_conversations, make_segmenter
from medlora.modeling.prompts import answer_choices, prompt_messages, render_chat, scoring_context, training_messages
from medlora.modeling.tokenizer import has_generation_marks

logger = logging.getLogger(__name__)

TINY_PRESET = "tiny-nemotron-h"

TRAIN_FILE, EARLY_STOP_FILE = "train.jsonl", "early_stop.jsonl"


def is_labeled(row: dict[str, Any]) -> bool:
    return row.get("cop") in range(len(LETTERS))


def render_examples(rows: list[dict[str, Any]], tokenizer: Any, format_config: FormatConfig) -> list[dict[str, Any]]:
    """Labeled rows -> `{"id", "messages", "input_ids", "completion_mask"}` each (no length limit applied).

    The ids and mask are those of `apply_chat_template(..., return_assistant_tokens_mask=True)` (or of
    `mask_by_prompt_prefix` for a template without generation marks), computed faster (see the fast-path note).
    Raises ValueError for an unlabeled row (cop not 0-3) and FormatError when no answer token of a row gets the loss.
    """
    conversations = [
        training_messages(row, format_config.system_prompt, format_config.include_explanation) for row in rows
    ]
    if not conversations:
        return []
    encoded = encode_conversations(rows, conversations, tokenizer, make_segmenter(tokenizer))
    return [
        {"id": row["id"], "messages": messages, "input_ids": example.ids(), "completion_mask": example.mask()}
        for row, messages, example in zip(rows, conversations, encoded, strict=True)
    ]


def render_example(row: dict[str, Any], tokenizer: Any, format_config: FormatConfig) -> dict[str, Any]:
    """One labeled row -> its formatted dict (see `render_examples`)."""
    return render_examples([row], tokenizer, format_config)[0]


def check_scoring_parity(tokenizer: Any, row: dict[str, Any], config: FormatConfig) -> dict[str, Any]:
    """Does evaluation score what training teaches, with this tokenizer and chat template? Checked on one labeled row.

    1. the generation prompt is a token prefix of the training conversation (else the loss mask and the scored
       context disagree on where the answer starts);
    2. context + each of the four choices splits at the context's end (one context for all choices, as lm-eval's
       `_encode_pair` needs), and context + the correct choice is a prefix of the training tokens.
    Returns what held; raises FormatError naming the first problem.
    """
    example = render_example(row, tokenizer, config)
    ids = example["input_ids"]
    prompt = render_chat(tokenizer, prompt_messages(row, config.system_prompt), add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise FormatError(
            f"the chat template's generation prompt {prompt[-40:]!r} is not a token prefix of the training "
            "conversation: evaluation and `medlora ask` would score after another context than training taught"
        )
    context = scoring_context(tokenizer, row, config.system_prompt)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    for letter, choice in zip(LETTERS, answer_choices(row), strict=True):
        whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        if whole[: len(context_ids)] != context_ids:
            raise FormatError(
                f"context + choice {letter} ({choice!r}) merges across the context's last token: the choices would "
                "be scored from different contexts (the answer prefix must end on a token boundary)"
            )
    correct = tokenizer(context + answer_choices(row)[int(row["cop"])], add_special_tokens=False)["input_ids"]
    if ids[: len(correct)] != correct:
        raise FormatError("context + the correct answer does not tokenize as the training example does")
    return {"prompt_is_token_prefix": True, "choices_split_at_context": True, "correct_choice_matches_training": True}


def fit_to_length(example: dict[str, Any], max_length: int, on_overflow: str) -> tuple[dict[str, Any] | None, str]:
    """(example or None, outcome) with outcome one of kept, truncated, too_long (dropped), answer_cut (dropped).

    `truncate` keeps the first `max_length` tokens, as long as at least one answer token survives; a row whose
    whole answer would be cut is dropped rather than trained with no loss.
    """
    ids, mask = example["input_ids"], example["completion_mask"]
    if len(ids) <= max_length:
        return example, "kept"
    if on_overflow == "drop":
        return None, "too_long"
    if not any(mask[:max_length]):
        return None, "answer_cut"
    return {**example, "input_ids": ids[:max_length], "completion_mask": mask[:max_length]}, "truncated"


def early_stop_ids(ids: list[str], size: int) -> set[str]:
    """The `size` ids with the smallest sha256: deterministic, independent of row order and of the other rows."""
    if size >= len(ids):
        raise ValueError(f"format.early_stopping_size {size} leaves no training rows ({len(ids)} rows kept): lower it")
    return set(sorted(ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())[:size])


def length_stats(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    if not lengths:
        return {key: 0 for key in ("min", "mean", "p50", "p90", "p99", "max")}
    values = np.asarray(lengths)
    stats = {"min": int(values.min()), "mean": round(float(values.mean()), 2)}
    stats.update({f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 90, 99)})
    return {**stats, "max": int(values.max())}


def format_rows(
    rows: list[dict[str, Any]], tokenizer: Any, config: FormatConfig, chunk_size: int = 1000
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Render, fit and count every row; returns ([(id, JSON line)] of kept examples, counts for the report).

    Always rows_in == rows_kept + rows_dropped + unlabeled_skipped; truncated rows are among the kept.
    """
    # The rows (and everything else alive) never become garbage here: freezing them spares the cyclic collector
    # from walking 180k row dicts over and over as the examples are built (about 1.5 s of the stage).
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        return _format_rows(rows, tokenizer, config, chunk_size)
    finally:
        if not frozen_before:
            gc.unfreeze()


def _format_rows(
    rows: list[dict[str, Any]], tokenizer: Any, config: FormatConfig, chunk_size: int
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    kept: list[tuple[str, str]] = []
    lengths: list[int] = []
    answer_lengths: list[int] = []  # tokens that carry the loss
    outcomes = dict.fromkeys(("kept", "truncated", "too_long", "answer_cut"), 0)
    dropped_ids: list[str] = []
    labeled = [row for row in rows if is_labeled(row)]
    segmenter = make_segmenter(tokenizer)  # one cache for the whole run: segments recur across chunks
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # = json.dumps(x, same options)
    start, log_every = time.monotonic(), max(1, len(labeled) // (10 * chunk_size))  # about 10 progress lines
    for done in range(0, len(labeled), chunk_size):
        chunk = labeled[done : done + chunk_size]
        conversations = [training_messages(row, config.system_prompt, config.include_explanation) for row in chunk]
        for row, messages, encoded in zip(
            chunk, conversations, encode_conversations(chunk, conversations, tokenizer, segmenter), strict=True
        ):
            if encoded.tokens <= config.max_length:  # fit_to_length keeps it as it is: assemble its line directly
                outcomes["kept"] += 1
                # The bytes of json.dumps({"id", "messages", "input_ids", "completion_mask"}) with these options.
                line = (
                    f'{{"id":{dumps(row["id"])},"messages":{dumps(messages)},'
                    f'"input_ids":[{encoded.ids_json()}],"completion_mask":[{encoded.mask_json()}]}}'
                )
                kept.append((row["id"], line))
                lengths.append(encoded.tokens)
                answer_lengths.append(encoded.answer_tokens())
                continue
            example = {
                "id": row["id"],
                "messages": messages,
                "input_ids": encoded.ids(),
                "completion_mask": encoded.mask(),
            }
            fitted, outcome = fit_to_length(example, config.max_length, config.on_overflow)
            outcomes[outcome] += 1
            if fitted is None:
                dropped_ids.append(example["id"])
                continue
            kept.append((fitted["id"], dumps(fitted)))
            lengths.append(len(fitted["input_ids"]))
            answer_lengths.append(sum(fitted["completion_mask"]))
        number, elapsed = min(done + chunk_size, len(labeled)), time.monotonic() - start
        rate = number / elapsed if elapsed else float("inf")
        if (done // chunk_size) % log_every == 0 or number == len(labeled):
            logger.info(
                "format: %d/%d rows, %.0f rows/s, ETA %.0f s",
                number,
                len(labeled),
                rate,
                (len(labeled) - number) / rate,
            )
    return kept, {
        "rows_in": len(rows),
        "rows_kept": len(kept),
        "rows_dropped": outcomes["too_long"] + outcomes["answer_cut"],
        "rows_truncated": outcomes["truncated"],
        "unlabeled_skipped": len(rows) - len(labeled),
        "dropped_by_reason": {"too_long": outcomes["too_long"], "answer_cut": outcomes["answer_cut"]},
        "dropped_ids": dropped_ids[:10],
        "token_lengths": length_stats(lengths),
        "completion_tokens": length_stats(answer_lengths),
    }


def load_tokenizer(base_dir: str | Path) -> Any:
    """The base model's tokenizer, as `AutoTokenizer.from_pretrained(base_dir)` loads it.

    The tiny preset's own tokenizer (trained by `tokenizer.train_chat_tokenizer`, saved as a tokenizers-backed
    `PreTrainedTokenizerFast`, for a model type AutoTokenizer maps to no class of its own) loads through that class
    directly: AutoTokenizer resolves it to the same class, but imports model configs first (about 2 s of the
    stage's 15). Every other tokenizer goes through AutoTokenizer.
    """
    base = Path(base_dir)
    try:
        preset = read_json(base / BASE_REFERENCE_FILE).get("preset")
        tokenizer_config = read_json(base / "tokenizer_config.json")
    except (OSError, ValueError):
        preset, tokenizer_config = None, {}
    if (
        preset == TINY_PRESET
        and tokenizer_config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
        and "auto_map" not in tokenizer_config
    ):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(base))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def format_training_data(
    validated_train: str | Path, base_dir: str | Path, out_dir: str | Path, config: FormatConfig
) -> dict[str, Any]:
    """The `format` stage: read the validated train split, write `train.jsonl` and `early_stop.jsonl` into
    `out_dir` (atomically), return the report (counts, token-length stats, timing).

    Only the train split is read: the early-stopping slice can come from nowhere else.
    """
    start = time.monotonic()
    rows = read_jsonl(validated_train, COLUMNS)
    tokenizer = load_tokenizer(base_dir)
    kept, counts = format_rows(rows, tokenizer, config)
    early = early_stop_ids([row_id for row_id, _ in kept], config.early_stopping_size)
    with (
        atomic_directory(out_dir) as staging,
        (staging / TRAIN_FILE).open("w", encoding="utf-8") as train,
        (staging / EARLY_STOP_FILE).open("w", encoding="utf-8") as early_stop,
    ):
        for row_id, line in kept:
            (early_stop if row_id in early else train).write(line + "\n")
    seconds = time.monotonic() - start
    return FormatReport(
        **counts,
        train_rows=len(kept) - len(early),
        early_stop_rows=len(early),
        early_stop_source=str(validated_train),
        max_length=config.max_length,
        on_overflow=config.on_overflow,
        include_explanation=config.include_explanation,
        mask_source="generation_marks" if has_generation_marks(tokenizer) else "prompt_prefix",
        seconds=round(seconds, 2),
        rows_per_second=round(len(rows) / seconds, 1) if seconds else None,
    )


def run(params: Params) -> FormatReport:
    """The `format` stage: validated train rows -> `train.jsonl` + `early_stop.jsonl` in `paths.formatted_dir`."""
    return format_training_data(
        Path(params.paths.validated_dir) / "train.jsonl",
        params.paths.base_model_dir,
        params.paths.formatted_dir,
        params.format,
    )
