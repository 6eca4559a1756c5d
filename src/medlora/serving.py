"""Use the champion: `medlora ask` (multiple-choice or free-form) and `medlora export` (adapter dir for vLLM).

Both take the adapter version holding an alias (default `champion`) from the registry, so what answers is always
what the gates let through. Multiple-choice questions are rendered exactly as in training (prompts.py) and the four
possible answers are scored by log-likelihood after the common answer prefix, the way the evaluation's chat task
(lm-eval `acc`) scores them; free-form questions are answered by greedy generation.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import LETTERS, OPTION_COLUMNS
from medlora.core.io import atomic_directory, read_json, write_json
from medlora.modeling.prompts import answer_choices, render_chat, scoring_context
from medlora.registry.client import RegistryError, alias_version, open_registry

logger = logging.getLogger(__name__)

FREE_FORM_SYSTEM_PROMPT = "You are a medical expert. Answer the question."
EXPORT_BASE_DIR = "base_model"
VLLM_DEFAULT_MAX_LORA_RANK = 16
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}


def champion_version(params: Params, alias: str) -> str:
    """The adapter version holding `alias`; raises RegistryError when no version holds it."""
    version = alias_version(open_registry(params), params.register.adapter_name, alias)
    if version is None:
        raise RegistryError(
            f"no version of {params.register.adapter_name} holds the alias {alias!r}: run the pipeline (make run) "
            "or promote a version (medlora promote VERSION)"
        )
    return version


def load_champion(params: Params, alias: str = "champion") -> tuple[Any, Any]:
    """(PeftModel, tokenizer) of the adapter version holding `alias`, through the registry's pyfunc."""
    import mlflow

    version = champion_version(params, alias)
    logger.info("loading %s version %s (@%s)", params.register.adapter_name, version, alias)
    wrapper = mlflow.pyfunc.load_model(f"models:/{params.register.adapter_name}/{version}").unwrap_python_model()
    return wrapper.model, wrapper.tokenizer


def question_row(question: str, options: list[str]) -> dict[str, Any]:
    if len(options) != len(LETTERS):
        raise ValueError(f'--options needs {len(LETTERS)} options separated by "|", got {len(options)}: {options}')
    return {"question": question, **dict(zip(OPTION_COLUMNS, options, strict=True))}


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


def answer_multiple_choice(
    model: Any, tokenizer: Any, question: str, options: list[str], system_prompt: str
) -> tuple[int, list[float]]:
    """(index of the most likely answer, log-likelihood of each answer)."""
    row = question_row(question, options)
    scores = score_choices(model, tokenizer, scoring_context(tokenizer, row, system_prompt), answer_choices(row))
    return max(range(len(scores)), key=scores.__getitem__), scores


def answer_free_form(model: Any, tokenizer: Any, question: str, max_new_tokens: int) -> str:
    from medlora.registry.adapter_model import generate

    messages = [{"role": "system", "content": FREE_FORM_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    return generate(model, tokenizer, [prompt], max_new_tokens)[0].strip()


def vllm_command(base: str, revision: str | None, directory: Path, rank: int) -> str:
    """The `vllm serve` line the seed describes, with the flags this adapter needs."""
    command = f"vllm serve {base}"
    if revision:
        command += f" --revision {revision}"
    command += f" --enable-lora --lora-modules medlora={directory}"
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        command += f" --max-lora-rank {rank}"
    # Thinking off, as in training and evaluation (prompts.render_chat): Nemotron-3's template otherwise opens a
    # <think> block the adapter was never trained to fill. Templates without the switch ignore it.
    return command + f" --default-chat-template-kwargs '{json.dumps(CHAT_TEMPLATE_KWARGS)}'"


def export_adapter(params: Params, alias: str, directory: str | Path) -> dict[str, Any]:
    """Write the adapter holding `alias` (PEFT files + medlora_base.json, plus the base when it is shipped) to
    `directory`; returns the export manifest, whose `vllm_command` serves it."""
    import mlflow
    from mlflow.models import Model

    version = champion_version(params, alias)
    name = params.register.adapter_name
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    artifacts = Model.load(local / "MLmodel").flavors["python_function"]["artifacts"]
    directory = Path(directory).resolve()
    reference = read_json(local / artifacts["adapter"]["path"] / "medlora_base.json")
    with atomic_directory(directory) as staging:
        shutil.copytree(local / artifacts["adapter"]["path"], staging, dirs_exist_ok=True)
        if "base" in artifacts:
            shutil.copytree(local / artifacts["base"]["path"], staging / EXPORT_BASE_DIR)
            base, revision = str(directory / EXPORT_BASE_DIR), None
        else:
            base, revision = reference["name_or_path"], reference.get("revision")
        # PEFT (AutoPeftModelForCausalLM) and vLLM read the base from here: the training machine's path is useless.
        config = json.loads((staging / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if config.get("target_parameters"):
            logger.warning("this adapter has LoRA on routed experts (target_parameters): vLLM may not load it")
        manifest = {
            "registered_model": name,
            "version": version,
            "alias": alias,
            "base_model": base,
            "revision": revision,
            "vllm_command": vllm_command(base, revision, directory, int(config.get("r", 0))),
        }
        write_json(staging / "medlora_export.json", manifest)
    return manifest
