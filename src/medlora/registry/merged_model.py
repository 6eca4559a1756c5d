"""The registered merged model: an MLflow pyfunc that answers MedMCQA rows with the training prompt.

MLflow's transformers flavor serves a bare text-generation pipeline: a question posted to it gets no chat prompt,
and the tiny model answers "." or "". So the merged model is logged like the adapter, as "models from code"
(merged_pyfunc.py, standalone), with the merged transformers directory as its artifact `merged/` (the checkpoint
TensorRT-LLM or vLLM can take as it is) and the prompt's variable parts (system prompts, answer prefix) as its
model config. The loading and answering code lives in merged_pyfunc; this module adds what only logging needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from medlora.modeling.prompts import ANSWER_PREFIX
from medlora.registry import merged_pyfunc
from medlora.registry.merged_pyfunc import DEFAULT_MAX_NEW_TOKENS, FREE_FORM_SYSTEM_PROMPT, MERGED_ARTIFACT

logger = logging.getLogger(__name__)

MODEL_CODE_FILE = Path(merged_pyfunc.__file__).resolve()


def merged_signature() -> Any:
    """Input: MedMCQA's `question` and (optional: none for a free question) `opa`..`opd`; output: letter, option,
    answer and per-letter scores; param `max_new_tokens` (long, 64) for free questions."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    options = [ColSpec("string", column, required=False) for column in merged_pyfunc.OPTION_COLUMNS]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "question"), *options]),
        outputs=Schema(
            [
                ColSpec("string", "letter", required=False),
                ColSpec("string", "option", required=False),
                ColSpec("string", "answer"),
                ColSpec(Map(DataType.double), "scores", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


def prompt_config(system_prompt: str) -> dict[str, str]:
    """The model config the pyfunc renders with: the training prompt's variable parts."""
    return {
        "system_prompt": system_prompt,
        "answer_prefix": ANSWER_PREFIX,
        "free_form_system_prompt": FREE_FORM_SYSTEM_PROMPT,
    }


def log_merged_model(
    merged_dir: str | Path,
    system_prompt: str,
    pip_requirements: list[str],
    name: str = "merged",
    tags: dict[str, str] | None = None,
) -> Any:
    """Log the merged directory with the answering pyfunc to the active run; returns MLflow's ModelInfo."""
    merged_dir = Path(merged_dir).resolve()
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir} holds no merged model (config.json): run the merge stage")
    logger.info("logging %s as models from code (%s)", merged_dir, MODEL_CODE_FILE.name)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE_FILE),
        artifacts={MERGED_ARTIFACT: str(merged_dir)},
        model_config=prompt_config(system_prompt),
        pip_requirements=pip_requirements,
        signature=merged_signature(),
        tags=tags,
    )
