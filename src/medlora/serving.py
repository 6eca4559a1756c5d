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

# One implementation of the scoring for `medlora ask` and the served merged model (a standalone file MLflow ships).
from medlora.registry.merged_pyfunc import FREE_FORM_SYSTEM_PROMPT, continuation_ids, score_choices  # noqa: F401

logger = logging.getLogger(__name__)

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


def portable_base(reference: dict[str, Any], shipped: bool) -> tuple[str, str | None]:
    """(how the exported files name the base, a note for the manifest): never a path of the exporting machine.

    A shipped base is `base_model`, relative to the export directory; a hub base its hub id. A base that is a local
    directory elsewhere (say model.name_or_path: /models/nemotron) is named by its directory name only: where it
    lies on the serving machine is for whoever serves it to say.
    """
    if shipped:
        return EXPORT_BASE_DIR, f"{EXPORT_BASE_DIR}/ in this directory"
    name = str(reference["name_or_path"])
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):
        folder = Path(name).name
        return folder, f"a local directory named {folder} (weights sha256 {reference.get('weights_sha256')})"
    return name, None


def scrub_paths(directory: Path, replacements: dict[str, str]) -> None:
    """Replace the exporting machine's paths in the text files under `directory` (PEFT's README names the base
    path of the machine that trained: `base_model: /...` and a `base_model:adapter:/...` tag)."""
    for file in (p for p in directory.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".bin")):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        changed = text
        for path in sorted(replacements, key=len, reverse=True):  # longest first: a path may contain another
            changed = changed.replace(path, replacements[path])
        if changed != text:
            file.write_text(changed, encoding="utf-8")


def machine_paths_in(directory: Path, paths: list[str]) -> list[str]:
    """`file: path` for every file under `directory` whose bytes contain one of `paths`."""
    needles = [path.encode() for path in dict.fromkeys(paths) if path]
    found = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        content = file.read_bytes()
        found += [f"{file.relative_to(directory)}: {needle.decode()}" for needle in needles if needle in content]
    return found


def export_adapter(params: Params, alias: str, directory: str | Path) -> dict[str, Any]:
    """Write the adapter holding `alias` (PEFT files + medlora_base.json, plus the base when it is shipped) to
    `directory`; returns the export manifest, whose `vllm_command` serves it from here.

    The files written carry no absolute path of this machine or of the one that trained: the base is named relative
    to the directory (or by hub id), so the directory can be copied anywhere. The manifest file's `vllm_command`
    runs from inside the directory; the returned one names this machine's paths.
    """
    import mlflow
    from mlflow.models import Model

    version = champion_version(params, alias)
    name = params.register.adapter_name
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    artifacts = Model.load(local / "MLmodel").flavors["python_function"]["artifacts"]
    directory = Path(directory).resolve()
    reference = read_json(local / artifacts["adapter"]["path"] / "medlora_base.json")
    shipped = "base" in artifacts
    portable, note = portable_base(reference, shipped)
    with atomic_directory(directory) as staging:
        shutil.copytree(local / artifacts["adapter"]["path"], staging, dirs_exist_ok=True)
        if shipped:
            shutil.copytree(local / artifacts["base"]["path"], staging / EXPORT_BASE_DIR)
            here, revision = str(directory / EXPORT_BASE_DIR), None
        else:
            here, revision = str(reference["name_or_path"]), reference.get("revision")
        config = json.loads((staging / "adapter_config.json").read_text())
        trained_on = str(config.get("base_model_name_or_path") or "")
        # PEFT (AutoPeftModelForCausalLM) and vLLM read the base from here: the training machine's path is useless.
        config["base_model_name_or_path"] = portable
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        machine = [path for path in (trained_on, str(reference.get("name_or_path") or "")) if Path(path).is_absolute()]
        scrub_paths(staging, dict.fromkeys(machine, portable))
        if config.get("target_parameters"):
            logger.warning("this adapter has LoRA on routed experts (target_parameters): vLLM may not load it")
        rank = int(config.get("r", 0))
        manifest = {
            "registered_model": name,
            "version": version,
            "alias": alias,
            "base_model": portable,
            "base_model_note": note,
            "revision": revision,
            "vllm_command": vllm_command(portable, revision, Path("."), rank),
            "vllm_command_runs_from": "the directory holding this file",
        }
        write_json(staging / "medlora_export.json", manifest)
        left = machine_paths_in(staging, [*machine, str(local), str(directory), str(staging)])
        if left:  # a file we do not know of carries a path: refuse rather than ship it
            raise RuntimeError(f"the export would carry this machine's paths ({'; '.join(left)}): nothing written")
    return {**manifest, "base_model": here, "vllm_command": vllm_command(here, revision, directory, rank)}
