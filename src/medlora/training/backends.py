"""Training backends: `hf` (transformers + peft + trl) and `unsloth` (FastLanguageModel), one SFTTrainer.

Both end in a PEFT model trained by TRL's SFTTrainer on the pre-tokenized rows of the format stage
(`input_ids` + `completion_mask`: the loss is on the answer only). `params.lora` feeds LoraConfig and
`params.train` feeds SFTConfig under the same field names; the few keys that feed neither are listed below.
transformers/trl are imported inside the functions, after `resolve_backend`: unsloth must be imported before
them to patch them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

from medlora.core.config import LoraParams, TrainConfig
from medlora.core.io import read_jsonl

logger = logging.getLogger(__name__)

UNSLOTH_VERSION = "2026.10.9"
UNSLOTH_HINT = (
    "run `make unsloth-test` (builds .venv-unsloth with CPU torch), or install it into this environment with "
    f"`pip install --no-deps unsloth=={UNSLOTH_VERSION} unsloth_zoo=={UNSLOTH_VERSION}` plus their dependencies "
    "except torch/torchvision/xformers (scripts/unsloth_env.sh lists how)"
)
LORA_OWN_KEYS = {"required_blocks"}  # lora.* keys that feed our coverage gate, not LoraConfig
TRAIN_OWN_KEYS = {
    "backend",
    "loss_explosion_factor",
    "gpu_memory",
    "allow_reference_mamba_scan",
}  # train.* keys that feed us, not SFTConfig


class UnslothUnavailable(RuntimeError):
    """train.backend is unsloth but unsloth does not import here."""


def resolve_backend(name: str) -> str:
    """`hf` or `unsloth` for train.backend; imports unsloth (first, so it can patch transformers/trl) when asked.

    Raises UnslothUnavailable with the install hint when `unsloth` was asked for and does not import.
    """
    if name == "hf":
        return "hf"
    try:
        import unsloth  # noqa: F401
    except Exception as error:  # ImportError, or unsloth's own "no accelerator" errors
        if name == "unsloth":
            raise UnslothUnavailable(
                f"train.backend is unsloth but `import unsloth` failed ({error}): {UNSLOTH_HINT}"
            ) from error
        logger.info("train.backend auto: unsloth does not import here (%s); using hf", error)
        return "hf"
    if name == "auto":
        logger.info("train.backend auto: unsloth imports; using unsloth")
    return "unsloth"


# Architectures whose SSM (Mamba) layers mix neighbouring tokens: sequences flattened into one row would leak into
# each other unless the CUDA mamba_ssm kernels, which take the sequence boundaries, are present (FINDINGS).
SSM_HYBRID_MODEL_TYPES = {"nemotron_h", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid", "mamba2"}


def padding_free_supported(model_type: str, attn_implementation: str, has_gpu: bool) -> bool:
    """Whether a batch can be flattened into one unpadded row without tokens seeing the other examples.

    Needs flash attention (it reads the per-example position_ids as boundaries; measured here: sdpa and eager
    on CPU let a flattened example attend to the one before it), and, for Mamba hybrids such as NemotronH, the CUDA
    `mamba_ssm` kernels (the CPU reference scan carries state across the boundary). Otherwise: length-grouped
    batches with dynamic padding.
    """
    if not (has_gpu and attn_implementation.startswith(("flash_attention", "kernels-community/flash"))):
        return False
    return model_type not in SSM_HYBRID_MODEL_TYPES or importlib.util.find_spec("mamba_ssm") is not None


def batching(train: TrainConfig, model_config: Any, has_gpu: bool) -> str:
    """How batches are built, for the log and reports/train.json."""
    model_type, attention = model_config.model_type, model_config._attn_implementation or "eager"
    if padding_free_supported(model_type, attention, has_gpu):
        return f"padding-free batches of {train.per_device_train_batch_size} (no pad tokens; {model_type}, {attention})"
    kind = "length-grouped" if train.train_sampling_strategy == "group_by_length" else train.train_sampling_strategy
    reason = (
        "needs flash attention on a GPU"
        if model_type not in SSM_HYBRID_MODEL_TYPES
        else (f"{model_type} needs flash attention and the CUDA-only mamba_ssm")
    )
    return f"{kind} batches of {train.per_device_train_batch_size} with dynamic padding (padding-free {reason})"


def cpu_fallbacks(train: TrainConfig, has_gpu: bool) -> tuple[dict[str, Any], list[str]]:
    """SFTConfig overrides for options that only exist on a GPU, and what each changed. Pure.

    bf16 is not among them: with `use_cpu=True` the Trainer runs bf16 autocast on a CPU, so the production params
    train in the checkpoint's dtype here too (slowly), and the replica test exercises the dtype the GPU run uses.
    """
    if has_gpu:
        return {}, []
    overrides: dict[str, Any] = {}
    notes = []
    if "8bit" in train.optim or train.optim.startswith("paged_"):
        overrides["optim"] = "adamw_torch"
        notes.append(f"optim {train.optim} -> adamw_torch (bitsandbytes needs CUDA)")
    return overrides, notes


KERNEL_INSTALL = (
    "pip install -e '.[gpu]'   # mamba-ssm + causal-conv1d, built against your CUDA torch (README: GPU installs)"
)


def check_gpu_requirements(train: TrainConfig, model_type: str, has_gpu: bool) -> None:
    """Before any weights are loaded: refuse a GPU run that would crawl or crash later.

    - NemotronH (and other Mamba hybrids) without the CUDA kernels falls back to transformers' reference torch scan:
      correct, but much slower, and its temporaries are estimated at tens of GiB per Mamba layer at batch 4 x 1024;
      refused unless `train.allow_reference_mamba_scan` says so.
    - `optim: adamw_8bit` (any bitsandbytes optimizer) without bitsandbytes fails after loading 60 GB otherwise.
    Raises RuntimeError with the install command. On a CPU nothing applies (cpu_fallbacks).
    """
    if not has_gpu:
        return
    missing = [name for name in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name) is None]
    if model_type in SSM_HYBRID_MODEL_TYPES and missing and not train.allow_reference_mamba_scan:
        raise RuntimeError(
            f"{model_type} on a GPU without {', '.join(missing)}: transformers would run the slow reference Mamba "
            f"scan (tens of GiB of temporaries per layer). Install the kernels: {KERNEL_INSTALL}; or set "
            "train.allow_reference_mamba_scan: true to accept the slow path"
        )
    if ("8bit" in train.optim or train.optim.startswith("paged_")) and importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"train.optim {train.optim} needs bitsandbytes, which is not installed: {KERNEL_INSTALL} "
            "(the gpu extra includes it), or set train.optim: adamw_torch"
        )


def lora_kwargs(lora: LoraParams) -> dict[str, Any]:
    """params.lora as LoraConfig keyword arguments (same names); checks the routed-expert dropout rule."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(lora).items()}
    for key in LORA_OWN_KEYS:
        kwargs.pop(key)
    if kwargs["target_parameters"] and kwargs["lora_dropout"] != 0:
        raise ValueError(
            f"lora.target_parameters {kwargs['target_parameters']} needs lora.lora_dropout: 0 "
            f"(PEFT cannot apply dropout to 3-D expert parameters; got {kwargs['lora_dropout']})"
        )
    if not kwargs["target_parameters"]:
        kwargs.pop("target_parameters")
    return kwargs


def sft_config(train: TrainConfig, output_dir: str | Path, has_gpu: bool, model_config: Any = None) -> Any:
    """SFTConfig from params.train (same field names) plus what this pipeline fixes, GPU fallbacks applied."""
    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    values = dataclasses.asdict(train)
    unknown = sorted(set(values) - fields - TRAIN_OWN_KEYS)
    if unknown:
        raise ValueError(f"train.{unknown[0]} is not an SFTConfig field (trl changed?); rename or remove it")
    overrides, notes = cpu_fallbacks(train, has_gpu)
    if notes:
        logger.warning("no GPU: %s", ", ".join(notes))
    kwargs = {k: v for k, v in values.items() if k in fields} | overrides
    return SFTConfig(
        output_dir=str(output_dir),
        **kwargs,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        eval_strategy="steps",
        save_strategy="steps",
        eval_on_start=True,  # the answer-token loss before any training: the "before" of before/after
        logging_first_step=True,  # the explosion check compares against the first loss
        logging_nan_inf_filter=False,  # a NaN must reach the health check, not be averaged away
        include_num_input_tokens_seen="non_padding",
        completion_only_loss=True,
        packing=False,  # the format stage already fitted each row; padding_free removes the padding instead
        padding_free=model_config is not None
        and padding_free_supported(model_config.model_type, model_config._attn_implementation or "eager", has_gpu),
        max_length=None,  # the format stage already fitted every row to format.max_length
        report_to="none",  # one MLflow run per pipeline run, logged by monitoring.TrainingMonitor
        use_cpu=not has_gpu,
        save_only_model=False,  # optimizer and scheduler states are what make a resume exact
    )


def load_formatted(path: str | Path) -> Any:
    """A `datasets.Dataset` of `input_ids` + `completion_mask` from a format-stage JSON-lines file.

    Raises ValueError naming the file and line when a row lacks them, their lengths differ or no token is masked in.
    """
    from datasets import Dataset

    rows = []
    for number, row in enumerate(read_jsonl(path, ("input_ids", "completion_mask"), allow_empty=True), start=1):
        ids, mask = row["input_ids"], row["completion_mask"]
        if not ids or mask is None or len(ids) != len(mask) or not any(mask):
            raise ValueError(f"{path}: row {number}: needs input_ids and a completion_mask of the same length with a 1")
        rows.append({"input_ids": ids, "completion_mask": mask})
    if not rows:
        raise ValueError(f"{path}: no rows (run the format stage)")
    return Dataset.from_list(rows)


def load_peft_model(
    backend: str, base_dir: str | Path, lora: LoraParams, train: TrainConfig, has_gpu: bool, max_seq_length: int = 2048
) -> tuple[Any, Any]:
    """(PEFT model, tokenizer) through the chosen backend; on CPU the weights are loaded as float32.

    The tokenizer is always the base directory's (the one the format stage tokenized with).
    """
    from transformers import AutoTokenizer, set_seed

    from medlora.modeling.base_model import device_map, load_base_model, weights_location

    kwargs = lora_kwargs(lora)
    set_seed(train.seed)  # the same LoRA initialisation for the same params
    if backend == "unsloth":
        import torch
        from unsloth import FastLanguageModel

        location, revision = weights_location(base_dir)
        model, _ = FastLanguageModel.from_pretrained(
            model_name=location,
            revision=revision,
            max_seq_length=max_seq_length,  # format.max_length: every formatted row already fits it
            dtype=None if has_gpu else torch.float32,
            load_in_4bit=False,
            use_gradient_checkpointing=train.gradient_checkpointing,
        )
        model = FastLanguageModel.get_peft_model(
            model, **kwargs, random_state=train.seed, use_gradient_checkpointing=train.gradient_checkpointing
        )
        return model, AutoTokenizer.from_pretrained(str(base_dir))
    from peft import LoraConfig, get_peft_model

    # The checkpoint's dtype on CPU and GPU alike (bf16 for Nemotron-3-Nano); PEFT keeps the adapters in float32.
    model, tokenizer = load_base_model(base_dir, device_map=device_map())
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs)), tokenizer


def sft_trainer_class(backend: str, has_gpu: bool) -> type:
    """TRL's SFTTrainer, or on a CPU (hf backend) a subclass that computes the loss through the model's forward.

    TRL 1.15 computes the SFT loss through a fused LM head whose kernel is Triton-only: on a CPU it fails with
    "'NoneType' object has no attribute 'apply'" (no triton) or inside Triton (CUDA tensors expected). The
    model's own causal-LM loss over the same labels (-100 outside the completion) is the same quantity. Unsloth's
    CPU backend patches TRL's fused head itself, so it keeps TRL's class.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    if has_gpu or backend == "unsloth":
        return SFTTrainer

    class CpuSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return CpuSFTTrainer
