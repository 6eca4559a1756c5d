"""The on-disk layout of a checkpoint: tensor names, shapes and dtypes, read from safetensors headers only.

A merged model is served by the tools that load the hub checkpoint (vLLM, TensorRT-LLM), so it must have exactly
the base checkpoint's layout. transformers gets the names right (`save_pretrained` reverts the NemotronH load
conversion to the hub's `backbone.` names and per-expert tensors) but not the dtypes: loading in bf16 casts the
float32 Mamba `A_log`/`D` down, and `save_pretrained` writes a transformers-5 config.json (`layers_block_type`,
`dtype`) that older loaders do not read. `match_layout` puts both back.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Layout = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)
# The files besides the weights that make a directory "the checkpoint": config and the remote-code files it names.
CONFIG_FILES = ("config.json", "generation_config.json")


class LayoutMismatch(RuntimeError):
    """A saved model's tensors differ in name or shape from the checkpoint it must match."""


def checkpoint_files(location: str | Path, revision: str | None = None) -> list[Path]:
    """The safetensors shards of a local directory, or of a hub model already in the local cache (never downloads).

    Raises FileNotFoundError when there are none.
    """
    if Path(location).is_dir():
        files = sorted(Path(location).glob("*.safetensors"))
    else:
        from huggingface_hub import snapshot_download  # only for hub ids: it reads the cache, no network

        cached = snapshot_download(
            str(location), revision=revision, allow_patterns=["*.safetensors"], local_files_only=True
        )
        files = sorted(Path(cached).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{location}: no safetensors weights found")
    return files


def read_layout(files: list[Path], where: dict[str, Path] | None = None) -> Layout:
    """Every tensor's dtype and shape, from the headers (no weights are read); `where` gets each tensor's file."""
    from safetensors import safe_open

    layout: Layout = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_slice(name)
                layout[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
                if where is not None:
                    where[name] = file
    return layout


def layout_difference(expected: Layout, actual: Layout) -> list[str]:
    """What differs, as readable lines (names missing or extra, shapes, dtypes); empty when they match."""
    problems = [f"missing tensor {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"extra tensor {name}" for name in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        (want_dtype, want_shape), (dtype, shape) = expected[name], actual[name]
        if want_shape != shape:
            problems.append(f"{name}: shape {list(shape)}, the checkpoint has {list(want_shape)}")
        elif want_dtype != dtype:
            problems.append(f"{name}: dtype {dtype}, the checkpoint has {want_dtype}")
    return problems


def restore_base_tensors(model: Any, base_location: str | Path, revision: str | None = None) -> int:
    """Before saving: give the in-memory parameters whose dtype loading changed (float32 Mamba A_log/D loaded as
    bf16) the base checkpoint's exact tensors back, so `save_pretrained` writes the base's dtypes at once and no
    60 GB of shards has to be rewritten afterwards. Only parameters the merge did not change are restored (a merged
    LoRA target keeps its merged values). Returns how many were restored.

    In-memory names are the hub's with `model.` for `backbone.` (transformers' NemotronH conversion); a name that
    does not map is left to `match_layout`, which checks the saved files anyway.
    """
    import torch
    from safetensors import safe_open

    source: dict[str, Path] = {}
    expected = read_layout(checkpoint_files(base_location, revision), source)
    restored = 0
    for name, parameter in model.named_parameters():
        hub_name = "backbone." + name.removeprefix("model.") if name.startswith("model.") else name
        if hub_name not in expected or _dtype_name(parameter) == expected[hub_name][0]:
            continue
        with safe_open(str(source[hub_name]), framework="pt") as handle:
            original = handle.get_tensor(hub_name)
        if original.shape == parameter.shape and original.to(parameter.dtype).equal(parameter.detach().cpu()):
            with torch.no_grad():
                parameter.data = original.to(parameter.device)
            restored += 1
    return restored


def match_layout(directory: str | Path, base_location: str | Path, revision: str | None = None) -> int:
    """Give the model saved in `directory` the base checkpoint's dtypes and config files; returns how many tensors
    were changed back. A tensor the merge left alone (equal to the base's at the loaded precision) gets the base's
    exact bytes; one it changed is cast. Raises LayoutMismatch when a tensor name or shape differs."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_files = checkpoint_files(base_location, revision)
    source: dict[str, Path] = {}
    expected = read_layout(base_files, source)
    directory = Path(directory)
    shards = sorted(directory.glob("*.safetensors"))
    structural = [line for line in layout_difference(expected, read_layout(shards)) if "dtype" not in line]
    if structural:
        raise LayoutMismatch(f"{directory} does not have the base checkpoint's tensors: {'; '.join(structural[:5])}")
    cast = 0
    for shard in shards:
        tensors = load_file(str(shard))
        wrong = {name for name, tensor in tensors.items() if _dtype_name(tensor) != expected[name][0]}
        for name in wrong:
            with safe_open(str(source[name]), framework="pt") as handle:
                original = handle.get_tensor(name)
            untouched = original.to(tensors[name].dtype).equal(tensors[name])
            tensors[name] = original if untouched else tensors[name].to(original.dtype)
        if wrong:
            save_file(tensors, str(shard), metadata={"format": "pt"})
            cast += len(wrong)
    base_dir = base_files[0].parent
    for name in CONFIG_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, directory / name)
    for code in base_dir.glob("*.py"):  # the remote-code files config.json's auto_map names (never run here)
        shutil.copy2(code, directory / code.name)
    logger.info("merged layout: %d tensors cast back to the checkpoint's dtypes; config from %s", cast, base_dir)
    return cast


def _dtype_name(tensor: Any) -> str:
    import torch

    return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}[tensor.dtype]
