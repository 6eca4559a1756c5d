"""The registered adapter's MLflow pyfunc, logged as "models from code": this file is copied into the artifact.

Why a file and not a pickled object: a cloudpickled `PythonModel` refers to the module that defined its class, so
every registered version would break the day that module is renamed or changed, and unpickling runs arbitrary code.
MLflow stores this file next to the MLmodel and runs it at load time; it ends with `mlflow.models.set_model(...)`.

Why standalone (stdlib, mlflow, torch, transformers and peft; no medlora import needed): the code that loads a
version is the code that was registered with it, so a later medlora release cannot change how an old version
loads, and whoever serves the model elsewhere needs no medlora internals. The one exception is optional:
when medlora is importable, `BaseModelUnavailable` is medlora's own class, so medlora code that catches it
(and its tests) sees the same type whichever way the adapter was loaded.

The guarantees (FINDINGS: a PEFT model logged with MLflow's defaults reloads random base weights, silently):
- the adapter is applied on exactly the base its reference (medlora_base.json) names;
- a shipped base (the embedded tiny preset) is verified against the reference's `weights_sha256`;
- a base that is missing, corrupt or out of reach raises `BaseModelUnavailable` naming it, never loads another.
medlora.registry.adapter_model logs this file and re-exports its functions, so there is one implementation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc

logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base"
# Must equal medlora.modeling.base_model.BASE_REFERENCE_FILE (tests/registry/test_adapter_model.py checks).
BASE_REFERENCE_FILE = "medlora_base.json"
DEFAULT_MAX_NEW_TOKENS = 64
_TRUE = ("1", "true", "yes", "on")

try:  # medlora's class when medlora is installed, so `except BaseModelUnavailable` there catches ours
    from medlora.modeling.base_model import BaseModelUnavailable
except ImportError:  # served without medlora: same name, same base class, same messages

    class BaseModelUnavailable(RuntimeError):  # type: ignore[no-redef]
        """The base model an adapter needs is not where its reference says (or cannot be downloaded here)."""


def directory_hash(path: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over the relative names and bytes of a directory's files (but those named in `exclude`).

    A copy of medlora.core.io.directory_hash, which recorded `weights_sha256`: the two must agree byte for byte
    (tested), and this file may not import medlora.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(str(file.relative_to(root)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_adapter_reference(adapter_dir: str | Path) -> dict[str, Any]:
    """The base reference an adapter directory carries (medlora_base.json, copied there by the train stage)."""
    path = Path(adapter_dir) / BASE_REFERENCE_FILE
    if not path.exists():
        raise BaseModelUnavailable(f"{path} is missing: this adapter does not say which base model it needs")
    return json.loads(path.read_text(encoding="utf-8"))


def ships_base(reference: dict[str, Any]) -> bool:
    """Ship the base inside the artifact only when its weights are local (the tiny preset: a few MB)."""
    return reference.get("name_or_path") is None


def describe_base(reference: dict[str, Any]) -> str:
    """The base as a person would name it: hub id@revision, or the local preset and its weights' hash."""
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


def torch_dtype(name: str) -> Any:
    """The torch dtype a reference's `torch_dtype` names (float32, bfloat16 or float16)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_adapter(adapter_dir: str | Path, shipped_base: str | Path | None = None) -> tuple[Any, Any]:
    """(PeftModel in eval mode, tokenizer): the base resolved from the adapter's reference, then the adapter.

    Raises BaseModelUnavailable (with the base's name, revision or path) when the base cannot be loaded here.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = read_adapter_reference(adapter_dir)
    location, revision = resolve_base(reference, shipped_base)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            location, revision=revision, dtype=torch_dtype(reference.get("torch_dtype") or "float32")
        )
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
        hint = " (HF_HUB_OFFLINE is set: hub models cannot be downloaded)" if offline else ""
        raise BaseModelUnavailable(
            f"cannot load the base model this adapter needs, {describe_base(reference)}{hint}: {error}"
        ) from error
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    logger.info("adapter %s loaded on %s", adapter_dir, describe_base(reference))
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


def prompts_of(model_input: Any) -> list[str]:
    """The prompts in a pyfunc input: a string, a list of strings, or a DataFrame whose first column holds them."""
    if hasattr(model_input, "iloc"):
        return [str(value) for value in model_input.iloc[:, 0]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(value) for value in model_input]


class AdapterModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts (strings, already rendered with the chat template) -> generated continuations.

    After loading, `.model` (the PeftModel) and `.tokenizer` are public: medlora's serving scores with them.
    """

    def load_context(self, context):
        self.model, self.tokenizer = load_adapter(
            context.artifacts[ADAPTER_ARTIFACT], context.artifacts.get(BASE_ARTIFACT)
        )

    # No type hints here: MLflow reads them as a schema and warns; the explicit signature says the same.
    def predict(self, context, model_input, params=None):
        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        return generate(self.model, self.tokenizer, prompts_of(model_input), max_new_tokens)


# MLflow runs this file (under a throwaway module name) when logging and when loading, and takes the model from
# here. An ordinary `import medlora.registry.adapter_pyfunc` runs it too; that only sets a global MLflow
# overwrites on the next models-from-code load, so it is not worth guarding on MLflow's private module naming.
mlflow.models.set_model(AdapterModel())
