"""A byte-level BPE tokenizer trained locally, with a ChatML chat template, for the embedded tiny model.

The chat template marks the assistant turn with `{% generation %}` so TRL's `assistant_only_loss` and
`return_assistant_tokens_mask` work; the format is the seed's `<|im_start|>role ... <|im_end|>`.

Evaluation scores " A", " B", " C", " D" right after "The correct answer is": each must be one token, the same
token in training text and in "context + choice". `answer_letter_tokens` checks it; the corpus the `model` stage
trains on holds every answer a row can have, so those merges are among the most frequent and always learned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from medlora.core.contracts import LETTERS

IM_START, IM_END, PAD, BOS = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"
ROLES: tuple[str, ...] = ("system", "user", "assistant")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast` with the ChatML template.

    Deterministic: the same texts and vocab size give the same files, byte for byte (the BPE trainer breaks
    frequency ties by pair, not by hash order). Special tokens: pad, begin-of-text, <|im_start|>, <|im_end|>
    (the end-of-turn token doubles as EOS, as in ChatML models). No BOS is added on encode: the chat template
    alone decides what a conversation's tokens are, so `tokenizer(text)` and `apply_chat_template` agree.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, IM_START, IM_END]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def answer_letter_tokens(tokenizer: Any) -> dict[str, int]:
    """{letter: token id} of " A".." D" as they follow "is"; raises ValueError when one is not a single token.

    A letter split into pieces (" " + "B") would be scored on a different token sequence than training taught
    whenever evaluation and training cut the text in different places.
    """
    tokens: dict[str, int] = {}
    for letter in LETTERS:
        with_context = tokenizer(f"is {letter})", add_special_tokens=False)["input_ids"]
        alone = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(alone) != 1 or with_context[-2:-1] != alone:
            pieces = tokenizer.convert_ids_to_tokens(with_context)
            raise ValueError(
                f"tokenizer: ' {letter}' after 'is' is not one token ({pieces}); retrain it on a corpus that "
                "contains the answers (medlora.modeling.base_model.tokenizer_corpus) or raise its vocab size"
            )
        tokens[letter] = alone[0]
    return tokens


def has_generation_marks(tokenizer: Any) -> bool:
    """True when the chat template marks the assistant turn with `{% generation %}` (assistant masks work)."""
    import re

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
