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
from typing import Any, NamedTuple

from medlora.core.config import FormatConfig, Params
from medlora.core.contracts import COLUMNS, LETTERS, FormatReport
from medlora.core.io import atomic_directory, read_json, read_jsonl
from medlora.modeling.base_model import BASE_REFERENCE_FILE
from medlora.modeling.prompts import answer_choices, prompt_messages, render_chat, scoring_context, training_messages
from medlora.modeling.tokenizer import has_generation_marks

logger = logging.getLogger(__name__)

TINY_PRESET = "tiny-nemotron-h"

TRAIN_FILE, EARLY_STOP_FILE = "train.jsonl", "early_stop.jsonl"


class FormatError(ValueError):
    """A row the chat template cannot turn into a training example with a loss on the answer."""


def is_labeled(row: dict[str, Any]) -> bool:
    return row.get("cop") in range(len(LETTERS))


def mask_by_prompt_prefix(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, mask) for a template without `{% generation %}` marks (many hub models ship none).

    The prompt rendered with `add_generation_prompt=True` must be a token prefix of the whole conversation;
    the rest is the assistant turn, minus trailing whitespace-only tokens (the newline after end-of-turn).
    Raises FormatError when it is not a prefix: masking by position would then put the loss on the wrong tokens.
    """
    prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = render_chat(tokenizer, messages, tokenize=True, return_dict=True)
    prompt_ids, ids = list(prompt["input_ids"]), list(full["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(ids))
        raise FormatError(
            "the chat template has no {% generation %} marks and its generation prompt is not a token prefix of "
            f"the conversation (first difference at token {at}: prompt {tokenizer.decode(prompt_ids[at : at + 5])!r}"
            f" vs conversation {tokenizer.decode(ids[at : at + 5])!r}); add generation marks to the template"
        )
    end = len(ids)
    while end > len(prompt_ids) and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1
    return ids, [0] * len(prompt_ids) + [1] * (end - len(prompt_ids)) + [0] * (len(ids) - end)


def reference_examples(
    rows: list[dict[str, Any]], conversations: list[list[dict[str, str]]], tokenizer: Any
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, mask) per conversation the slow, obvious way: what the fast path must reproduce exactly.

    `apply_chat_template(..., return_assistant_tokens_mask=True)` through `render_chat` when the template has
    generation marks, `mask_by_prompt_prefix` otherwise. Used for tokenizers the fast path cannot serve.
    """
    if has_generation_marks(tokenizer):
        out = render_chat(tokenizer, conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return [(list(ids), list(mask)) for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)]
    encoded = []
    for row, messages in zip(rows, conversations, strict=True):
        try:
            encoded.append(mask_by_prompt_prefix(messages, tokenizer))
        except FormatError as error:
            raise FormatError(f"row {row['id']!r}: {error}") from None
    return encoded


# The fast path. Profiled on 183k rows (tiny preset), `apply_chat_template(tokenize=True,
# return_assistant_tokens_mask=True)` spent most of its time in the Rust tokenizer (about 70 us a row), then in
# converting its output and walking char_to_token, then in json.dumps of the id lists. The texts repeat a lot:
# the system turn is the same in every row, and option lines and answers recur. So the rendered text is cut into
# segments at places where the tokenizer is known to start a new token (`split_at_newlines`), every distinct
# segment is tokenized once (one batched `tokenizer(...)` call per chunk), and a row's tokens are its segments'
# tokens end to end. The mask comes from the same generation spans and the same `Encoding.char_to_token` as
# `apply_chat_template`'s own, and JSON lines are assembled from per-segment id strings.
SAFE_BEFORE_NEWLINE = frozenset(map(chr, range(0x21, 0x7F)))  # printable ASCII but space: never whitespace
# The cache holds each segment's tokenizers.Encoding (about 100 bytes a token): emptied past this many tokens,
# which bounds it near 100 MB; frequent segments come back at once.
SEGMENT_CACHE_TOKENS = 1_000_000


class Segment(NamedTuple):
    """One tokenized piece of text: its length in characters, its token count, its ids as the body of a JSON list
    ("5,17,3"), and its `tokenizers.Encoding` (ids, and offsets relative to the piece)."""

    chars: int
    tokens: int
    ids_json: str
    encoding: Any


def split_at_newlines(text: str) -> list[str]:
    """`text` cut before every newline that follows a printable ASCII character (space excluded).

    For a ByteLevel BPE with the GPT-2 split pattern (`line_segmentable`), a token there always ends: no pattern
    branch matches both a non-space character and a newline, and added tokens hold no newline. So each piece
    tokenizes on its own exactly as it does inside the text.
    """
    parts = text.split("\n")
    pieces, current = [], parts[0]
    for part in parts[1:]:
        if current and current[-1] in SAFE_BEFORE_NEWLINE:
            pieces.append(current)
            current = "\n" + part
        else:
            current += "\n" + part
    pieces.append(current)
    return pieces


def line_segmentable(tokenizer: Any) -> bool:
    """True when `split_at_newlines` pieces tokenize independently with this tokenizer: no normalizer, the
    ByteLevel pre-tokenizer with its GPT-2 split pattern and no prefix space, a deterministic BPE, and added
    tokens that hold no newline and do not strip or look at their neighbours."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    plain_added = all(
        "\n" not in token["content"] and not (token["lstrip"] or token["rstrip"] or token["single_word"])
        for token in spec.get("added_tokens", [])
    )
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex") is True
        and pre.get("add_prefix_space") is False
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and plain_added
    )


class SegmentTokenizer:
    """Tokenizes texts through a cache of segments (see the fast-path note above); exact by construction.

    Segments go through `tokenizer(..., add_special_tokens=False)`, the very call `apply_chat_template` makes on
    the whole text. A tokenizer that cannot be cut safely gets one segment per text (no reuse, still one batched
    call and no per-token Python work).
    """

    def __init__(self, tokenizer: Any, max_tokens: int = SEGMENT_CACHE_TOKENS):
        self.tokenizer = tokenizer
        self.split = split_at_newlines if line_segmentable(tokenizer) else (lambda text: [text])
        self.max_tokens = max_tokens
        self.entries: dict[str, Segment] = {}
        self.cached_tokens = 0
        self.blank: dict[int, bool] = {}

    def encode(self, texts: list[str]) -> list[list[Segment]]:
        pieces = [self.split(text) for text in texts]
        if self.cached_tokens > self.max_tokens:
            self.entries.clear()
            self.cached_tokens = 0
        entries = self.entries
        missing = list(dict.fromkeys(piece for row in pieces for piece in row if piece not in entries))
        if missing:
            out = self.tokenizer(missing, add_special_tokens=False, padding=False, truncation=False)
            for piece, ids, encoding in zip(missing, out["input_ids"], out.encodings, strict=True):
                entries[piece] = Segment(len(piece), len(ids), ",".join(map(str, ids)), encoding)
                self.cached_tokens += len(ids)
        return [[entries[piece] for piece in row] for row in pieces]

    def is_blank(self, token_id: int) -> bool:
        """`tokenizer.decode([token_id])` is whitespace only (mask_by_prompt_prefix's trailing-token rule)."""
        if token_id not in self.blank:
            self.blank[token_id] = not self.tokenizer.decode([token_id]).strip()
        return self.blank[token_id]


def segment_ids(segments: list[Segment]) -> list[int]:
    ids: list[int] = []
    for segment in segments:
        ids += segment.encoding.ids
    return ids


def char_to_token(segments: list[Segment], position: int) -> int | None:
    """The token that holds character `position` of the segments' text, as `Encoding.char_to_token` finds it in
    the whole text's encoding, or None.

    A segment's tokens lie inside its own characters, so only the segment holding `position` can hold the token.
    """
    chars = tokens = 0
    for segment in segments:
        if position < chars + segment.chars:
            index = segment.encoding.char_to_token(position - chars)
            return None if index is None else tokens + index
        chars += segment.chars
        tokens += segment.tokens
    return None


class Encoded(NamedTuple):
    """A conversation's tokens (as segments) and its loss mask as sorted, disjoint [start, stop) token ranges."""

    segments: list[Segment]
    tokens: int
    ranges: list[tuple[int, int]]

    def ids(self) -> list[int]:
        return segment_ids(self.segments)

    def mask(self) -> list[int]:
        mask, at = [], 0
        for start, stop in self.ranges:
            mask += [0] * (start - at) + [1] * (stop - start)
            at = stop
        return mask + [0] * (self.tokens - at)

    def ids_json(self) -> str:
        return ",".join(segment.ids_json for segment in self.segments if segment.tokens)

    def mask_json(self) -> str:
        parts, at = [], 0
        for start, stop in self.ranges:
            parts.append("0," * (start - at) + "1," * (stop - start))
            at = stop
        parts.append("0," * (self.tokens - at))
        return "".join(parts)[:-1]

    def answer_tokens(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, stop) ranges as their sorted union (setting mask tokens to 1 in any order gives the same mask)."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


class ReferenceIds(NamedTuple):
    """Stands in for a segment's Encoding where only the ids are known (rows handed to the reference)."""

    ids: list[int]


def from_reference(ids: list[int], mask: list[int]) -> Encoded:
    """A reference (ids, mask) pair as an Encoded (one segment), for rows the fast path hands back."""
    ranges = merge_ranges([(i, i + 1) for i, bit in enumerate(mask) if bit])
    segment = Segment(0, len(ids), ",".join(map(str, ids)), ReferenceIds(list(ids)))
    return Encoded([segment], len(ids), ranges)


def render_with_generation_spans(tokenizer: Any, conversations: list) -> tuple[list[str], list[list[tuple]]]:
    """Texts and generation spans (character ranges of each `{% generation %}` block) of `conversations`.

    The rendering `render_chat(tokenizer, conversations, tokenize=True, return_assistant_tokens_mask=True)` does,
    without its tokenization: transformers' own renderer, called with the arguments `apply_chat_template` gives it
    (the tokenizer's template and special tokens, thinking switched off as `render_chat` switches it).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    template_kwargs = {**tokenizer.special_tokens_map, "enable_thinking": False}
    return render_jinja_template(
        conversations=conversations,
        tools=None,
        documents=None,
        chat_template=tokenizer.get_chat_template(None, None),
        return_assistant_tokens_mask=True,
        continue_final_message=False,
        add_generation_prompt=False,
        **template_kwargs,
    )


def encode_by_generation_spans(
    rows: list[dict[str, Any]], conversations: list, tokenizer: Any, segmenter: SegmentTokenizer
) -> list[Encoded]:
    """`apply_chat_template(..., return_assistant_tokens_mask=True)`'s ids and mask, computed as it computes them."""
    texts, spans = render_with_generation_spans(tokenizer, conversations)
    if texts[0] != render_chat(tokenizer, conversations[0]):  # render_chat decides how a chat renders
        logger.warning("format: the fast renderer disagrees with render_chat; using the reference path")
        return [from_reference(*pair) for pair in reference_examples(rows, conversations, tokenizer)]
    encoded = []
    for index, (segments, row_spans) in enumerate(zip(segmenter.encode(texts), spans, strict=True)):
        tokens = sum(segment.tokens for segment in segments)
        ranges = []
        for start_char, end_char in row_spans:
            if end_char < 1:  # an empty block at the very start: the reference's char_to_token(-1) decides
                ranges = None
                break
            start = char_to_token(segments, start_char)
            end = char_to_token(segments, end_char - 1)
            if start is None:
                break
            ranges.append((start, end + 1 if end else tokens))
        if ranges is None:
            reference = reference_examples([rows[index]], [conversations[index]], tokenizer)[0]
            encoded.append(from_reference(*reference))
        else:
            encoded.append(Encoded(segments, tokens, merge_ranges(ranges)))
    return encoded


def encode_by_prompt_prefix(
    rows: list[dict[str, Any]], conversations: list, tokenizer: Any, segmenter: SegmentTokenizer
) -> list[Encoded]:
    """`mask_by_prompt_prefix` for every conversation, with the renders batched and the tokens from segments."""
    prompts = segmenter.encode(render_chat(tokenizer, [c[:-1] for c in conversations], add_generation_prompt=True))
    fulls = segmenter.encode(render_chat(tokenizer, conversations))
    encoded = []
    for row, messages, prompt, full in zip(rows, conversations, prompts, fulls, strict=True):
        prompt_ids, ids = segment_ids(prompt), segment_ids(full)
        if ids[: len(prompt_ids)] != prompt_ids:
            try:  # the reference raises its own message, naming where the two differ
                reference = mask_by_prompt_prefix(messages, tokenizer)
            except FormatError as error:
                raise FormatError(f"row {row['id']!r}: {error}") from None
            encoded.append(from_reference(*reference))
            continue
        end = len(ids)
        while end > len(prompt_ids) and segmenter.is_blank(ids[end - 1]):
            end -= 1
        encoded.append(Encoded(full, len(ids), merge_ranges([(len(prompt_ids), end)])))
    return encoded


def encode_conversations(
    rows: list[dict[str, Any]], conversations: list, tokenizer: Any, segmenter: SegmentTokenizer | None
) -> list[Encoded]:
    """Each conversation's tokens and loss mask, exactly as `reference_examples` gives them.

    Raises FormatError when no token of a row gets the loss (or, without generation marks, when the prompt is
    not a token prefix of the conversation).
    """
    if segmenter is None:  # a slow (Python) tokenizer gives no Encodings to cut and look up: the reference
        encoded = [from_reference(*pair) for pair in reference_examples(rows, conversations, tokenizer)]
    elif has_generation_marks(tokenizer):
        encoded = encode_by_generation_spans(rows, conversations, tokenizer, segmenter)
    else:
        encoded = encode_by_prompt_prefix(rows, conversations, tokenizer, segmenter)
    for row, example in zip(rows, encoded, strict=True):
        if not example.ranges:
            raise FormatError(
                f"row {row['id']!r}: the chat template marks no assistant token: nothing would be learned"
            )
    return encoded


def make_segmenter(tokenizer: Any) -> SegmentTokenizer | None:
    """The segment cache for a fast tokenizer (one per stage run or batch of rows); None for a slow one."""
    return SegmentTokenizer(tokenizer) if getattr(tokenizer, "is_fast", False) else None


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
