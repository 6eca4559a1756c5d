"""The registered adapter: an MLflow pyfunc that ships the LoRA adapter *and* the reference to its base model.

FINDINGS: a PEFT model logged with MLflow's defaults reloads with randomly initialised base weights and no error.
So the adapter is not logged as a transformers model. Its artifact holds:
- `adapter/`: the PEFT adapter as the train stage wrote it (safetensors, tokenizer, a copy of medlora_base.json);
- `base/` (only when the base's weights are local and small, i.e. the embedded tiny preset): the base model
  directory itself, verified against the `weights_sha256` its reference records;
- `adapter_pyfunc.py`: the pyfunc's code, logged as MLflow "models from code" rather than a cloudpickle, so
  loading runs the code registered with the version and depends on no medlora module path (see adapter_pyfunc).
Otherwise the reference names a hub id + revision (or a local directory), and loading where that base is not
available fails with `BaseModelUnavailable`, naming what is missing, rather than loading something else.

The loading functions live in adapter_pyfunc (the file MLflow copies); this module re-exports them for medlora's
own callers and adds what only logging needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from medlora.registry import adapter_pyfunc
from medlora.registry.adapter_pyfunc import (
    ADAPTER_ARTIFACT,
    BASE_ARTIFACT,
    AdapterModel,
    BaseModelUnavailable,
    describe_base,
    generate,
    load_adapter,
    read_adapter_reference,
    resolve_base,
    ships_base,
)

__all__ = [
    "ADAPTER_ARTIFACT",
    "BASE_ARTIFACT",
    "MODEL_CODE_FILE",
    "AdapterModel",
    "BaseModelUnavailable",
    "adapter_signature",
    "describe_base",
    "generate",
    "load_adapter",
    "log_adapter_model",
    "read_adapter_reference",
    "resolve_base",
    "ships_base",
]

logger = logging.getLogger(__name__)

# The source file itself (not a copy): what is logged is exactly the code medlora's own callers run.
MODEL_CODE_FILE = Path(adapter_pyfunc.__file__).resolve()


def adapter_signature() -> Any:
    """Input: one string column of prompts; output: one string per prompt; param `max_new_tokens` (long, 64)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", adapter_pyfunc.DEFAULT_MAX_NEW_TOKENS)]),
    )


def log_adapter_model(
    adapter_dir: str | Path,
    base_dir: str | Path | None,
    pip_requirements: list[str],
    name: str = "adapter",
    tags: dict[str, str] | None = None,
) -> Any:
    """Log the adapter (and, for a local base, `base_dir` itself) to the active run; returns MLflow's ModelInfo.

    `tags` go on the logged model (the register stage names the process logging it, see register.py).

    Raises BaseModelUnavailable when a local base must be shipped but `base_dir` is missing or holds other weights.
    """
    reference = read_adapter_reference(adapter_dir)
    artifacts = {ADAPTER_ARTIFACT: str(adapter_dir)}
    if ships_base(reference):
        if base_dir is None or not Path(base_dir).is_dir():
            raise BaseModelUnavailable(f"{adapter_dir} needs its local base model, but {base_dir} is not a directory")
        resolve_base(reference, base_dir)  # verifies weights_sha256 before anything is logged
        artifacts[BASE_ARTIFACT] = str(base_dir)
    logger.info(
        "logging %s as models from code (%s); base: %s", adapter_dir, MODEL_CODE_FILE.name, describe_base(reference)
    )
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE_FILE),  # a path: MLflow copies the file and runs it at load (models from code)
        artifacts=artifacts,
        pip_requirements=pip_requirements,
        signature=adapter_signature(),
        metadata={"base_model": describe_base(reference)},
        tags=tags,
    )
