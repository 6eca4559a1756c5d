"""The registered adapter: an MLflow pyfunc that ships the LoRA adapter *and* the reference to its base model.

FINDINGS: a PEFT model logged with MLflow's defaults reloads with randomly initialised base weights and no error.
So the adapter is not logged as a transformers model. Its artifact holds:
- `adapter/`: the PEFT adapter as the train stage wrote it (safetensors, tokenizer, a copy of medlora_base.json);
- `base/` (only when the base's weights are local and small, i.e. the embedded tiny preset): the base model
  directory itself, verified against the `weights_sha256` its reference records.
Otherwise the reference names a hub id + revision (or a local directory), and loading where that base is not
available fails with `BaseModelUnavailable`, naming what is missing, rather than loading something else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from medlora.core.hub import hub_offline
from medlora.core.io import directory_hash, read_json
from medlora.modeling.base_model import BASE_REFERENCE_FILE, BaseModelUnavailable, torch_dtype_of

logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base"


def read_adapter_reference(adapter_dir: str | Path) -> dict[str, Any]:
    """The base reference an adapter directory carries (medlora_base.json, copied there by the train stage)."""
    path = Path(adapter_dir) / BASE_REFERENCE_FILE
    if not path.exists():
        raise BaseModelUnavailable(f"{path} is missing: this adapter does not say which base model it needs")
    return read_json(path)


def ships_base(reference: dict[str, Any]) -> bool:
    """Ship the base inside the artifact only when its weights are local (the tiny preset: a few MB)."""
    return reference.get("name_or_path") is None


def describe_base(reference: dict[str, Any]) -> str:
    if reference.get("name_or_path") is None:
        return f"local base of preset {reference.get('preset')} (weights sha256 {reference.get('weights_sha256')})"
    return f"{reference['name_or_path']}@{reference.get('revision') or 'default revision'}"


def resolve_base(reference: dict[str, Any], shipped_base: str | Path | None) -> tuple[str, str | None]:
    """(location, revision) for `from_pretrained`: the shipped base, else the reference's local dir or hub id.

    Raises BaseModelUnavailable when the base is not where the reference says, or its weights do not match.
    """
    if shipped_base is not None and Path(shipped_base).is_dir():
        expected = reference.get("weights_sha256")
        # The recorded hash was taken before medlora_base.json was written into the directory.
        if expected and directory_hash(shipped_base, exclude=frozenset({BASE_REFERENCE_FILE})) != expected:
            raise BaseModelUnavailable(
                f"the base model shipped with this adapter ({shipped_base}) does not match the weights_sha256 "
                f"{expected} its reference records: the artifact is corrupt"
            )
        return str(shipped_base), None
    name = reference.get("name_or_path")
    if name is None:
        raise BaseModelUnavailable(
            f"this adapter needs the {describe_base(reference)}, which was neither shipped with it nor named by a "
            "path or hub id: re-register it from a pipeline run"
        )
    looks_local = name.startswith(("/", ".", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise BaseModelUnavailable(
            f"this adapter needs the base model at {name}, which does not exist on this machine "
            f"(reference: {describe_base(reference)}); restore it (dvc pull) or point model.name_or_path at a copy"
        )
    return name, reference.get("revision")


def load_adapter(adapter_dir: str | Path, shipped_base: str | Path | None = None) -> tuple[Any, Any]:
    """(PeftModel in eval mode, tokenizer): the base resolved from the adapter's reference, then the adapter.

    Raises BaseModelUnavailable (with the base's name, revision or path) when the base cannot be loaded here.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = read_adapter_reference(adapter_dir)
    location, revision = resolve_base(reference, shipped_base)
    dtype = torch_dtype_of(reference.get("torch_dtype") or "float32")
    try:
        base = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype)
    except OSError as error:
        hint = " (HF_HUB_OFFLINE is set: hub models cannot be downloaded)" if hub_offline() else ""
        raise BaseModelUnavailable(
            f"cannot load the base model this adapter needs, {describe_base(reference)}{hint}: {error}"
        ) from error
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(adapter_dir))


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (decoded without the prompt and special tokens)."""
    import torch

    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


class AdapterModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts (strings, already rendered with the chat template) -> generated continuations."""

    def load_context(self, context):
        self.model, self.tokenizer = load_adapter(
            context.artifacts[ADAPTER_ARTIFACT], context.artifacts.get(BASE_ARTIFACT)
        )

    # No type hints here: MLflow reads them as a schema and warns; the explicit signature says the same.
    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "iloc"):  # a DataFrame: its first column holds the prompts
            prompts = [str(value) for value in model_input.iloc[:, 0]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(value) for value in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        return generate(self.model, self.tokenizer, prompts, max_new_tokens)


def adapter_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )


def log_adapter_model(
    adapter_dir: str | Path, base_dir: str | Path | None, pip_requirements: list[str], name: str = "adapter"
) -> Any:
    """Log the adapter (and, for a local base, `base_dir` itself) to the active run; returns MLflow's ModelInfo.

    Raises BaseModelUnavailable when a local base must be shipped but `base_dir` is missing or holds other weights.
    """
    reference = read_adapter_reference(adapter_dir)
    artifacts = {ADAPTER_ARTIFACT: str(adapter_dir)}
    if ships_base(reference):
        if base_dir is None or not Path(base_dir).is_dir():
            raise BaseModelUnavailable(f"{adapter_dir} needs its local base model, but {base_dir} is not a directory")
        resolve_base(reference, base_dir)  # verifies weights_sha256 before anything is logged
        artifacts[BASE_ARTIFACT] = str(base_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=AdapterModel(),
        artifacts=artifacts,
        pip_requirements=pip_requirements,
        signature=adapter_signature(),
        metadata={"base_model": describe_base(reference)},
    )
