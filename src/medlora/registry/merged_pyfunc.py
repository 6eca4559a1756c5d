"""The registered merged model's MLflow pyfunc, logged as "models from code": this file is copied into the artifact.

What `mlflow models serve -m models:/medlora-merged@champion` runs. It takes MLflow's standard input with
MedMCQA's columns,

    {"dataframe_records": [{"question": "...", "opa": "...", "opb": "...", "opc": "...", "opd": "..."}]}

renders each row with the training prompt (system prompt, `Question: ...` and `A) ...` lines, the chat template
with thinking off, then the common answer prefix) and scores the four possible answers " A) <option>." by summed
log-likelihood, the way `medlora ask` and the evaluation's chat task score them. Each row is answered with

    {"letter": "B", "option": "Quinine", "answer": "B) Quinine", "scores": {"A": -9.1, "B": -7.3, ...}}

A row without options is a free question: it is answered by greedy generation (`max_new_tokens`, a param) under
the free-form system prompt, `letter`, `option` and `scores` then being null.

Standalone, like adapter_pyfunc (stdlib, mlflow, torch, transformers): the code that serves a version is the code
registered with it. The prompt pieces below are copies of medlora.modeling.prompts and the scoring a copy of what
serving.py used; tests/registry/test_merged_model.py checks that they render and score exactly like medlora's,
and medlora.serving imports the scoring from here, so `medlora ask` and the served model share it. The prompt's
variable parts (system prompts, answer prefix) come from the model config logged with the version.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc

logger = logging.getLogger(__name__)

MERGED_ARTIFACT = "merged"
LETTERS = ("A", "B", "C", "D")  # = medlora.core.contracts.LETTERS
OPTION_COLUMNS = ("opa", "opb", "opc", "opd")  # = medlora.core.contracts.OPTION_COLUMNS
DEFAULT_MAX_NEW_TOKENS = 64
# Defaults of the model config (register.py logs the project's values): medlora.modeling.prompts and serving.py.
ANSWER_PREFIX = "The correct answer is"
DEFAULT_SYSTEM_PROMPT = "You are a medical expert. Answer the multiple choice question."
FREE_FORM_SYSTEM_PROMPT = "You are a medical expert. Answer the question."


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template with thinking off (= prompts.render_chat with tokenize=False)."""
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, enable_thinking=False, tokenize=False
    )


def render_user(question: str, options: list[str]) -> str:
    """= prompts.render_user: the question, a blank line, then one `X) option` line per option."""
    lines = [f"{letter}) {option}" for letter, option in zip(LETTERS, options, strict=True)]
    return f"Question: {question.strip()}\n\n" + "\n".join(lines)


def scoring_context(
    tokenizer: Any, question: str, options: list[str], system_prompt: str, answer_prefix: str = ANSWER_PREFIX
) -> str:
    """= prompts.scoring_context: system + user turns, generation prompt, then the answer prefix."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": render_user(question, options)},
    ]
    return render_chat(tokenizer, messages, add_generation_prompt=True) + answer_prefix


def answer_choices(options: list[str]) -> list[str]:
    """= prompts.answer_choices: " A) <option>." for each option (the space belongs to the choice)."""
    return [f" {letter}) {option.strip()}." for letter, option in zip(LETTERS, options, strict=True)]


def free_form_prompt(tokenizer: Any, question: str, system_prompt: str = FREE_FORM_SYSTEM_PROMPT) -> str:
    """= what serving.answer_free_form generates after."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval does: encode the whole, cut at the context's length."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(context_ids)], whole[len(context_ids) :]


def score_choices(model: Any, tokenizer: Any, context: str, choices: list[str]) -> list[float]:
    """Sum of the log-probabilities of each choice's tokens after `context`."""
    import torch

    scores = []
    for choice in choices:
        context_ids, choice_ids = continuation_ids(tokenizer, context, choice)
        ids = torch.tensor([context_ids + choice_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, len(context_ids) :]
        scores.append(logprobs[len(context_ids) - 1 :].gather(1, targets[:, None]).sum().item())
    return scores


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (decoded without the prompt and special tokens, stripped)."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _given(value: Any) -> bool:
    """A cell that holds an option: not None, not NaN (pandas' missing value), not blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(str(value).strip())


def rows_of(model_input: Any) -> list[dict[str, Any]]:
    """The question rows of a pyfunc input: a DataFrame (MLflow's `dataframe_records`), a list of dicts or one dict,
    or plain strings (free questions)."""
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, str):
        return [{"question": model_input}]
    return [row if isinstance(row, dict) else {"question": str(row)} for row in model_input]


def row_options(row: dict[str, Any]) -> list[str] | None:
    """The four options of a row, or None for a free question (no option given); raises ValueError for 1-3."""
    given = [_given(row.get(column)) for column in OPTION_COLUMNS]
    if not any(given):
        return None
    if not all(given):
        missing = [column for column, present in zip(OPTION_COLUMNS, given, strict=True) if not present]
        raise ValueError(f"a multiple-choice row needs all of {', '.join(OPTION_COLUMNS)}; missing {missing}")
    return [str(row[column]).strip() for column in OPTION_COLUMNS]


def answer_row(model: Any, tokenizer: Any, row: dict[str, Any], config: dict[str, Any], max_new_tokens: int) -> dict:
    """One row's answer: letter, option, "X) option" and per-letter log-likelihoods; or the generated free answer."""
    if not _given(row.get("question")):
        raise ValueError("every row needs a non-empty `question`")
    question = str(row["question"])
    options = row_options(row)
    if options is None:
        prompt = free_form_prompt(tokenizer, question, config.get("free_form_system_prompt", FREE_FORM_SYSTEM_PROMPT))
        return {"letter": None, "option": None, "answer": generate(model, tokenizer, prompt, max_new_tokens),
                "scores": None}  # fmt: skip
    context = scoring_context(
        tokenizer,
        question,
        options,
        config.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
        config.get("answer_prefix", ANSWER_PREFIX),
    )
    scores = score_choices(model, tokenizer, context, answer_choices(options))
    best = max(range(len(scores)), key=scores.__getitem__)
    return {
        "letter": LETTERS[best],
        "option": options[best],
        "answer": f"{LETTERS[best]}) {options[best]}",
        "scores": dict(zip(LETTERS, scores, strict=True)),
    }


def load_merged(merged_dir: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from the merged transformers directory, in the dtype it was saved in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(merged_dir))


class MergedModel(mlflow.pyfunc.PythonModel):
    """pyfunc: MedMCQA rows -> answers (see the module doc). `.model` and `.tokenizer` are public after loading."""

    def load_context(self, context):
        self.prompt_config = dict(context.model_config or {})
        self.model, self.tokenizer = load_merged(context.artifacts[MERGED_ARTIFACT])
        logger.info("merged model loaded from %s", context.artifacts[MERGED_ARTIFACT])

    # No type hints here: MLflow reads them as a schema and warns; the explicit signature says the same.
    def predict(self, context, model_input, params=None):
        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        try:
            rows = rows_of(model_input)
            return [answer_row(self.model, self.tokenizer, row, self.prompt_config, max_new_tokens) for row in rows]
        except ValueError as error:  # a bad request, not a server fault: MLflow's server answers 400
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error


mlflow.models.set_model(MergedModel())
