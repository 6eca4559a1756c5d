"""The seed's prompt format, in one place: training, evaluation and serving all render through here.

    system:    You are a medical expert. Answer the multiple choice question.
    user:      Question: ...\n\nA) ...\nB) ...\nC) ...\nD) ...
    assistant: The correct answer is B) Quinine.\n\nExplanation: ...

The assistant turn starts with a prefix common to every answer ("The correct answer is") and then the letter.
Evaluation scores exactly what training taught the model to say first: the context ends with the prefix, and
each choice is the rest of one possible answer, " A) <option>.". The space belongs to the choice, not the
context: byte-level BPE tokenizers glue a space to the word after it, so " B" is one token in training and must
be one token at scoring time too (a context ending in a space would tokenize differently).
"""

from __future__ import annotations

from typing import Any

from medlora.core.contracts import LETTERS, OPTION_COLUMNS

ANSWER_PREFIX = "The correct answer is"
DEFAULT_SYSTEM_PROMPT = "You are a medical expert. Answer the multiple choice question."


def render_chat(tokenizer: Any, messages: Any, add_generation_prompt: bool = False, **kwargs: Any) -> Any:
    """`tokenizer.apply_chat_template` with thinking switched off: the one way a chat prompt is rendered here.

    Nemotron-3's template opens a `<think>` block in the generation prompt unless `enable_thinking` is false, while
    a trained conversation's assistant turn starts with an empty `<think></think>`: with thinking on, the prompt is
    not a token prefix of the conversation and evaluation would score after a different context than training
    taught. Templates without the switch ignore the variable. `kwargs` go to `apply_chat_template` (tokenize, ...).
    """
    kwargs.setdefault("tokenize", False)
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, enable_thinking=False, **kwargs
    )


def scoring_context(tokenizer: Any, row: dict[str, Any], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text evaluation and `medlora ask` score answers after: the prompt through the chat template (generation
    prompt included), then ANSWER_PREFIX. Each choice (`answer_choices`) starts with a space, so the context ends on
    a word and lm-eval has no trailing whitespace to move into the continuation."""
    return render_chat(tokenizer, prompt_messages(row, system_prompt), add_generation_prompt=True) + ANSWER_PREFIX


def render_user(question: str, options: list[str]) -> str:
    """The user turn: the question, a blank line, then one `X) option` line per option."""
    lines = [f"{letter}) {option}" for letter, option in zip(LETTERS, options, strict=True)]
    return f"Question: {question.strip()}\n\n" + "\n".join(lines)


def row_options(row: dict[str, Any]) -> list[str]:
    return [str(row[column]) for column in OPTION_COLUMNS]


def answer_choice(letter_index: int, option: str) -> str:
    """What follows ANSWER_PREFIX in an answer: " B) Quinine." (leading space included, see module doc)."""
    return f" {LETTERS[letter_index]}) {option.strip()}."


def answer_choices(row: dict[str, Any]) -> list[str]:
    """The four answers the model could have been trained to give, after the common prefix."""
    return [answer_choice(i, option) for i, option in enumerate(row_options(row))]


def render_answer(row: dict[str, Any], include_explanation: bool) -> str:
    """The assistant turn for a labeled row; the explanation follows when asked for and present."""
    cop = int(row["cop"])
    if cop not in range(len(LETTERS)):
        raise ValueError(f"row {row.get('id')!r}: cop {cop} is not a labeled answer (0-3)")
    answer = ANSWER_PREFIX + answer_choice(cop, row_options(row)[cop])
    explanation = (row.get("exp") or "").strip()
    if include_explanation and explanation:
        answer += f"\n\nExplanation: {explanation}"
    return answer


def prompt_messages(row: dict[str, Any], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """System and user turns for a row (no answer): what the model sees at training and at inference."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": render_user(str(row["question"]), row_options(row))},
    ]


def training_messages(
    row: dict[str, Any], system_prompt: str = DEFAULT_SYSTEM_PROMPT, include_explanation: bool = False
) -> list[dict[str, str]]:
    """The full conversation a labeled row is trained on."""
    return [
        *prompt_messages(row, system_prompt),
        {"role": "assistant", "content": render_answer(row, include_explanation)},
    ]
