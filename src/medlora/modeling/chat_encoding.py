"""Conversations -> token ids and the loss mask, exactly as `apply_chat_template(..., return_assistant_tokens_mask=
True)` gives them (or, for a template without `{% generation %}` marks, as `mask_by_prompt_prefix` derives them),
only faster: the format stage's hot loop on 194k rows (benchmarks/data_throughput.py). formatting.py calls it;
tests/modeling/test_formatting.py holds the fast path byte for byte against the reference on many tokenizers.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

from medlora.modeling.prompts import render_chat
from medlora.modeling.tokenizer import has_generation_marks

logger = logging.getLogger(__name__)


class FormatError(ValueError):
    """A row the chat template cannot turn into a training example with a loss on the answer."""


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
