"""Hooks the medlora lm-eval tasks name with `!function utils.<name>` (lm-eval imports this file by path).

Every task reads the project's validated validation split through `custom_dataset`, which lm-eval calls with the
TaskManager's metadata: `validation_file` (the split), and for the chat tasks `tokenizer` (a directory holding
the base model's tokenizer and chat template) and `system_prompt`. The chat strings are rendered once per row
here, so the logged samples show exactly what was scored.
"""

from __future__ import annotations

from typing import Any

# The built-in task's own prompt function: medmcqa_local's prompt is lm-eval's, by construction.
from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text

from medlora.core.contracts import COLUMNS
from medlora.core.io import read_jsonl
from medlora.modeling.prompts import ANSWER_PREFIX, answer_choices, render_answer, scoring_context

__all__ = [
    "chat_answer",
    "chat_choices",
    "chat_context",
    "chat_prompt",
    "chat_validation_split",
    "doc_to_text",
    "process_answer_loglik",
    "validation_split",
]


def validation_split(validation_file: str, **_: Any) -> Any:
    """`custom_dataset` for medmcqa_local: {"validation": the split's rows}, read strictly (file:line errors)."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_jsonl(validation_file, COLUMNS))})


def chat_validation_split(validation_file: str, tokenizer: str, system_prompt: str, **_: Any) -> Any:
    """`custom_dataset` for the chat tasks: the split's rows plus the rendered chat strings.

    Adds `chat_prompt` (up to the generation prompt), `chat_context` (+ ANSWER_PREFIX), `chat_choices` (the four
    possible answers after the prefix) and `chat_answer` (the reference answer, without explanation).
    """
    import datasets
    from transformers import AutoTokenizer

    chat_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    rows = []
    for row in read_jsonl(validation_file, COLUMNS):
        # The same context the format stage's parity test holds against the training tokens.
        context = scoring_context(chat_tokenizer, row, system_prompt)
        rows.append(
            {
                **row,
                "chat_prompt": context.removesuffix(ANSWER_PREFIX),
                "chat_context": context,
                "chat_choices": answer_choices(row),
                "chat_answer": render_answer(row, include_explanation=False),
            }
        )
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def chat_prompt(doc: dict[str, Any]) -> str:
    return doc["chat_prompt"]


def chat_context(doc: dict[str, Any]) -> str:
    return doc["chat_context"]


def chat_choices(doc: dict[str, Any]) -> list[str]:
    return list(doc["chat_choices"])


def chat_answer(doc: dict[str, Any]) -> str:
    return doc["chat_answer"]


def process_answer_loglik(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Per question: the answer's log-likelihood (nats) and whether it is the model's greedy continuation."""
    loglik, is_greedy = results[0]
    return {"answer_loglik": float(loglik), "answer_greedy": float(is_greedy)}
