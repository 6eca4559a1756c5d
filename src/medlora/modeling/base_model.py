"""The `model` stage's verb and the one loader every later stage uses.

`build_base_model` materialises the chosen preset into `paths.base_model_dir`:
- tiny-nemotron-h: a tokenizer trained on the validated train split and a NemotronH with random weights from a
  fixed seed, saved as a normal Hugging Face model directory;
- a hub preset: only the reference (id + pinned revision) and the tokenizer; the weights are loaded by
  `from_pretrained` at training time, on the machine with the GPU.
Either way it writes `medlora_base.json`, the reference an adapter needs to be reloaded onto the right base.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medlora.core.config import ModelConfig, Params
from medlora.core.contracts import COLUMNS, ModelReport, StageFailed
from medlora.core.hub import hub_offline
from medlora.core.io import atomic_directory, directory_hash, read_json, read_jsonl, write_json
from medlora.modeling.presets import TINY_VOCAB, Preset, get_preset, tiny_nemotron_h_config

logger = logging.getLogger(__name__)

BASE_REFERENCE_FILE = "medlora_base.json"
HUB_PREFLIGHT_TIMEOUT_S = 10.0


class BaseModelUnavailable(RuntimeError):
    """The base model an adapter needs is not where its reference says (or cannot be downloaded here)."""


def tokenizer_corpus(rows: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Texts the tiny tokenizer is trained on: the training conversations' text, turn by turn.

    Each turn is "role\\ncontent" without the special tokens (the BPE trainer does not split on them, so
    "<|im_start|>" in the corpus would only waste merges). Every row contributes all four answers it could
    have, so " A".." D" after "The correct answer is" are among the most frequent merges whatever the split.
    """
    from medlora.modeling.prompts import ANSWER_PREFIX, DEFAULT_SYSTEM_PROMPT, answer_choices, render_user, row_options

    yield f"system\n{DEFAULT_SYSTEM_PROMPT}"
    for row in rows:
        yield "user\n" + render_user(str(row["question"]), row_options(row))
        yield "assistant\n" + "\n".join(ANSWER_PREFIX + choice for choice in answer_choices(row))
        if row.get("exp"):
            yield f"Explanation: {row['exp']}"


def resolve_name_or_path(config: ModelConfig) -> tuple[str, str | None]:
    """(hub id or local dir, revision) for a hub preset; `model.name_or_path` overrides the preset's id."""
    preset = get_preset(config.preset)
    name = config.name_or_path or preset.hub_id
    if not name:
        raise ValueError(f"model.preset {config.preset!r} needs model.name_or_path (a hub id or a local directory)")
    return name, config.revision or preset.revision


def build_tiny_model(tokenizer: Any, seed: int) -> Any:
    """The tiny NemotronH for `tokenizer`, weights drawn from `seed` (the global RNG is left as it was)."""
    import torch
    from transformers import NemotronHForCausalLM

    config = tiny_nemotron_h_config(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return NemotronHForCausalLM(config)


def write_tiny_base(config: ModelConfig, preset: Preset, train_rows: list[dict[str, Any]], staging: Path) -> dict:
    """Train the tokenizer on `train_rows`, build the model, save both into `staging`; returns the reference."""
    from medlora.modeling.tokenizer import answer_letter_tokens, train_chat_tokenizer

    if not train_rows:
        raise ValueError("model: the tiny preset trains its tokenizer on the train split, which has no rows")
    tokenizer = train_chat_tokenizer(tokenizer_corpus(train_rows), vocab_size=TINY_VOCAB)
    answer_letter_tokens(tokenizer)  # fail here, not at evaluation, if " B" is not one token
    model = build_tiny_model(tokenizer, config.seed)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "tiny NemotronH: %d parameters, vocab %d, trained on %d rows", num_parameters, len(tokenizer), len(train_rows)
    )
    return {
        "preset": preset.name,
        "name_or_path": None,  # the directory itself
        "revision": None,
        "weights_sha256": directory_hash(staging),  # before medlora_base.json exists (see adapter_model)
        "torch_dtype": config.torch_dtype,
        "num_parameters": num_parameters,
    }


def check_hub_reachable(name: str, revision: str | None) -> None:
    """One request with a short timeout before `from_pretrained`, whose own retries take ~45 s to give up.

    Raises BaseModelUnavailable naming the model and what to do. Skipped for local directories and offline
    mode (where `from_pretrained` answers from the local cache at once).
    """
    if Path(name).is_dir() or hub_offline():
        return
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_PREFLIGHT_TIMEOUT_S)
    except Exception as error:  # network, auth (gated model) and not-found errors all mean: cannot build here
        raise BaseModelUnavailable(
            f"cannot reach {name}@{revision} on the model hub ({type(error).__name__}: {error}). This preset needs "
            "the hub (set HF_TOKEN if the model is gated) or a local copy named in model.name_or_path."
        ) from error


def load_hub_tokenizer(name: str, revision: str | None) -> Any:
    """The tokenizer of a hub/local model, with a ChatML template (marked turns) when it ships none."""
    from transformers import AutoTokenizer

    from medlora.modeling.tokenizer import CHATML_TEMPLATE, IM_END, IM_START

    check_hub_reachable(name, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except OSError as error:
        hint = "HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline() else "download failed"
        raise BaseModelUnavailable(
            f"cannot load the tokenizer of {name}@{revision} ({hint}): {error}. This preset needs the model hub "
            "(unset HF_HUB_OFFLINE; set HF_TOKEN if the model is gated) or a local directory in model.name_or_path."
        ) from error
    if not tokenizer.chat_template:
        vocab = tokenizer.get_vocab()
        if IM_START not in vocab or IM_END not in vocab:
            logger.warning("%s has no chat template and no ChatML tokens: ChatML markers will be plain text", name)
        tokenizer.chat_template = CHATML_TEMPLATE
        logger.info("%s ships no chat template: using medlora's ChatML template", name)
    return tokenizer


def build_base_model(config: ModelConfig, train_rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Write the base model directory for `config.preset`; returns the reference written to medlora_base.json.

    Raises ValueError for an unknown preset and BaseModelUnavailable when a hub preset cannot be reached.
    """
    preset = get_preset(config.preset)
    built_here = preset.hub_id is None and preset.name == "tiny-nemotron-h"
    if not built_here:
        name, revision = resolve_name_or_path(config)
        tokenizer = load_hub_tokenizer(name, revision)  # before any output is written: fail fast, leave nothing
    with atomic_directory(out_dir) as staging:
        if built_here:
            reference = write_tiny_base(config, preset, train_rows, staging)
        else:
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


def run(params: Params) -> ModelReport:
    """The `model` stage: the preset's base directory, then the chat-template parity check on its tokenizer.

    Raises StageFailed (with the report) when evaluation would not score what training teaches with this tokenizer,
    here rather than three stages later.
    """
    from transformers import AutoTokenizer

    from medlora.modeling.formatting import FormatError, check_scoring_parity, is_labeled

    train_rows = read_jsonl(Path(params.paths.validated_dir) / "train.jsonl", COLUMNS)
    reference = build_base_model(params.model, train_rows, params.paths.base_model_dir)
    report = ModelReport(**reference)
    tokenizer = AutoTokenizer.from_pretrained(params.paths.base_model_dir)
    row = next((row for row in train_rows if is_labeled(row)), None)
    if row is None:
        raise StageFailed("model: the train split has no labeled row to check the chat template on", report)
    try:
        checks = check_scoring_parity(tokenizer, row, params.format)
    except FormatError as error:
        raise StageFailed(f"model: preset {params.model.preset}: {error}", report) from None
    return dataclasses.replace(report, chat_template_checks=checks)


def read_base_reference(base_dir: str | Path) -> dict[str, Any]:
    """medlora_base.json of a base directory; raises BaseModelUnavailable when the `model` stage has not run."""
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


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, as TRL's SFTTrainer falls back.

    Nemotron-3's tokenizer defines no pad token (`torch.full(..., None)` would raise). Padded positions are masked
    out wherever this is used, so which token fills them does not change a result. Raises ValueError with neither.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token: nothing to pad with")


def device_map() -> Any:
    """Where `from_pretrained` puts the weights: "auto" (spread over the GPUs, offloading what does not fit) on a GPU,
    None (the CPU) otherwise. Under DDP each rank holds a whole copy on its own GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    state = PartialState()
    return {"": state.local_process_index} if state.num_processes > 1 else "auto"


def model_type_of(base_dir: str | Path) -> str:
    """The base's `model_type` (nemotron_h, ...) from its config.json alone: no weights are read."""
    from transformers import AutoConfig

    location, revision = weights_location(base_dir)
    return str(AutoConfig.from_pretrained(location, revision=revision).model_type)


def load_base_model(base_dir: str | Path, torch_dtype: str | None = None, device_map: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for the base in `base_dir`, through `from_pretrained` for every preset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = read_base_reference(base_dir)
    location, revision = weights_location(base_dir)
    dtype = torch_dtype_of(torch_dtype or reference["torch_dtype"])
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if reference["name_or_path"] is not None:
        check_hub_reachable(location, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype, device_map=device_map)
    except OSError as error:
        raise BaseModelUnavailable(f"cannot load base weights from {location}@{revision}: {error}") from error
    return model, tokenizer
