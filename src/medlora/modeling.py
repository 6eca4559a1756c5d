"""The `model` stage's verb and the one loader every later stage uses.

`build_base_model` materialises the chosen preset into `paths.base_model_dir`:
- tiny-nemotron-h: a tokenizer trained on the validated train split and a NemotronH with random weights from a
  fixed seed, saved as a normal Hugging Face model directory;
- a hub preset: only the reference (id + pinned revision) and the tokenizer; the weights are loaded by
  `from_pretrained` at training time, on the machine with the GPU.
Either way it writes `medlora_base.json`, the reference an adapter needs to be reloaded onto the right base.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medlora.config import ModelConfig
from medlora.io import atomic_directory, read_json, write_json
from medlora.presets import TINY_VOCAB, directory_hash, get_preset, tiny_nemotron_h_config

logger = logging.getLogger(__name__)

BASE_REFERENCE_FILE = "medlora_base.json"


class BaseModelUnavailable(RuntimeError):
    """The base model an adapter needs is not where its reference says (or cannot be downloaded here)."""


def tokenizer_corpus(rows: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Texts the tiny tokenizer is trained on: everything a prompt or an answer can contain."""
    from medlora.prompts import ANSWER_PREFIX, DEFAULT_SYSTEM_PROMPT, render_user, row_options

    yield DEFAULT_SYSTEM_PROMPT
    yield f"{ANSWER_PREFIX} A) B) C) D). Explanation:"
    for row in rows:
        yield render_user(str(row["question"]), row_options(row))
        if row.get("exp"):
            yield str(row["exp"])


def resolve_name_or_path(config: ModelConfig) -> tuple[str, str | None]:
    """(hub id or local dir, revision) for a hub preset; `model.name_or_path` overrides the preset's id."""
    preset = get_preset(config.preset)
    name = config.name_or_path or preset.hub_id
    if not name:
        raise ValueError(f"model.preset {config.preset!r} needs model.name_or_path (a hub id or a local directory)")
    return name, config.revision or preset.revision


def build_base_model(config: ModelConfig, train_rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Write the base model directory for `config.preset`; returns the reference written to medlora_base.json."""
    import torch

    preset = get_preset(config.preset)
    with atomic_directory(out_dir) as staging:
        if preset.hub_id is None and preset.name == "tiny-nemotron-h":
            from transformers import NemotronHForCausalLM

            from medlora.tokenizer import train_chat_tokenizer

            tokenizer = train_chat_tokenizer(tokenizer_corpus(train_rows), vocab_size=TINY_VOCAB)
            torch.manual_seed(config.seed)
            model_config = tiny_nemotron_h_config(
                len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
            )
            model = NemotronHForCausalLM(model_config)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            reference = {
                "preset": preset.name,
                "name_or_path": None,  # the directory itself
                "revision": None,
                "weights_sha256": directory_hash(staging),
                "torch_dtype": config.torch_dtype,
                "num_parameters": sum(p.numel() for p in model.parameters()),
            }
        else:
            from transformers import AutoTokenizer

            name, revision = resolve_name_or_path(config)
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
            except OSError as error:
                raise BaseModelUnavailable(
                    f"cannot load the tokenizer of {name}@{revision}: {error}. This needs the model hub (or a local "
                    "directory in model.name_or_path); set HF_TOKEN if the model is gated, and unset HF_HUB_OFFLINE."
                ) from error
            tokenizer.save_pretrained(staging)
            reference = {
                "preset": preset.name,
                "name_or_path": name,
                "revision": revision,
                "weights_sha256": None,
                "torch_dtype": config.torch_dtype if config.torch_dtype != "float32" else preset.torch_dtype,
            }
        write_json(Path(staging) / BASE_REFERENCE_FILE, reference)
    logger.info("base model %s written to %s", preset.name, out_dir)
    return reference


def read_base_reference(base_dir: str | Path) -> dict[str, Any]:
    path = Path(base_dir) / BASE_REFERENCE_FILE
    if not path.exists():
        raise BaseModelUnavailable(f"{path} is missing: run the `model` stage (dvc repro model) first")
    return read_json(path)


def weights_location(base_dir: str | Path) -> tuple[str, str | None]:
    """Where `from_pretrained` finds the weights: the directory itself (tiny) or the hub id and revision."""
    reference = read_base_reference(base_dir)
    if reference["name_or_path"] is None:
        return str(Path(base_dir).resolve()), None
    return reference["name_or_path"], reference["revision"]


def torch_dtype_of(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base_model(base_dir: str | Path, torch_dtype: str | None = None, device_map: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for the base in `base_dir`, through `from_pretrained` for every preset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = read_base_reference(base_dir)
    location, revision = weights_location(base_dir)
    dtype = torch_dtype_of(torch_dtype or reference["torch_dtype"])
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype, device_map=device_map)
    except OSError as error:
        raise BaseModelUnavailable(f"cannot load base weights from {location}@{revision}: {error}") from error
    return model, tokenizer


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def describe(base_dir: str | Path) -> str:
    return json.dumps(read_base_reference(base_dir))
