"""`medlora plan`: parameter counts and a training-memory estimate before anyone spends GPU hours.

The model is built on the meta device from its config (the production preset ships the published architecture
config, so nothing is downloaded) and wrapped with the params' LoRA config, so the counts are the real ones.
The memory model is the usual back-of-envelope one, with each term shown so a user can argue with it:

- weights: every base parameter in the training dtype (bf16: 2 bytes);
- LoRA weights, their gradients and AdamW's two moments in fp32 (PEFT keeps adapters in fp32): 4 + 4 + 8 bytes
  per trainable parameter (8-bit AdamW: 2 bytes of moments);
- activations: per token and layer, 34 x hidden bytes at 2-byte precision (Korthikanti et al. 2022, attention
  with a fused kernel, so no seq^2 term), scaled for fp32; with gradient checkpointing only each layer's input
  (hidden x bytes) is kept, plus one layer's activations while it is recomputed;
- logits: batch x seq x vocab in fp32, twice (the logits and their gradient), the term that dominates for large
  vocabularies.

Full fine-tuning (the seed's first row) keeps weights, gradients (2 bytes each) and AdamW moments (8 bytes) for
every parameter: 30B x 12 bytes = 360 GB.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from medlora.core.config import LoraParams, Params, TrainConfig
from medlora.modeling.presets import get_preset

logger = logging.getLogger(__name__)

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token per layer, at 2-byte precision (Korthikanti et al. 2022)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        return sum(asdict(self).values())


def parse_memory(text: str) -> float:
    """ "80GiB", "80 GB", "81920MiB" -> GiB (GB is taken as GiB's decimal sibling: 10^9 bytes)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: write it like 80GiB or 24GB")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    factor = {"gib": 1, "gb": 1e9 / GIB, "mib": 1 / 1024, "mb": 1e6 / GIB, "tib": 1024, "tb": 1e12 / GIB}[unit]
    return value * factor


def full_finetune_memory(num_params: float, weight_bytes: int = 2, optimizer_bytes: int = 8) -> MemoryEstimate:
    """The seed's 'Full Fine-tuning Memory = Weights + Gradients + Optimizer States', without activations."""
    return MemoryEstimate(
        weights_gib=num_params * weight_bytes / GIB,
        lora_weights_gib=0.0,
        gradients_gib=num_params * weight_bytes / GIB,
        optimizer_gib=num_params * optimizer_bytes / GIB,
        activations_gib=0.0,
        logits_gib=0.0,
    )


def lora_memory(
    num_params: float,
    trainable_params: float,
    *,
    weight_bytes: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    batch_size: int,
    sequence_length: int,
    gradient_checkpointing: bool,
    eight_bit_optimizer: bool = False,
) -> MemoryEstimate:
    """Peak training memory of LoRA on a frozen base (see the module docstring for each term)."""
    tokens = batch_size * sequence_length
    activation_scale = weight_bytes / 2
    per_layer = tokens * ACTIVATION_BYTES_PER_HIDDEN * hidden_size * activation_scale
    if gradient_checkpointing:
        activations = num_layers * tokens * hidden_size * weight_bytes + per_layer
    else:
        activations = num_layers * per_layer
    return MemoryEstimate(
        weights_gib=num_params * weight_bytes / GIB,
        lora_weights_gib=trainable_params * 4 / GIB,
        gradients_gib=trainable_params * 4 / GIB,
        optimizer_gib=trainable_params * (2 if eight_bit_optimizer else 8) / GIB,
        activations_gib=activations / GIB,
        logits_gib=2 * tokens * vocab_size * 4 / GIB,
    )


def preset_config(params: Params, preset_name: str) -> Any:
    """The architecture config of a preset without downloading weights (shipped file, tiny builder, or hub)."""
    from transformers import AutoConfig

    from medlora.modeling.presets import TINY_VOCAB, published_config, tiny_nemotron_h_config

    preset = get_preset(preset_name)
    if preset.architecture_config is not None:
        return published_config(preset_name)
    if preset.hub_id is None and preset.name == "tiny-nemotron-h":
        return tiny_nemotron_h_config(TINY_VOCAB, 0, 1, 3)
    name = params.model.name_or_path or preset.hub_id
    return AutoConfig.from_pretrained(name, revision=params.model.revision or preset.revision)


def count_parameters(config: Any, lora: LoraParams) -> dict[str, Any]:
    """Total and trainable parameters (per block type) of `config` wrapped with `lora`, built on the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medlora.modeling.blocks import trainable_params_by_block

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=list(lora.target_modules),
        target_parameters=list(lora.target_parameters) or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_config)
    by_block = trainable_params_by_block(peft_model)
    return {"total_params": total, "trainable_params": sum(by_block.values()), "trainable_params_by_block": by_block}


def plan(params: Params, preset_name: str | None = None, sequence_length: int | None = None) -> dict[str, Any]:
    """Counts and memory estimates (with and without gradient checkpointing) for a preset and the params."""
    preset_name = preset_name or params.model.preset
    config = preset_config(params, preset_name)
    counts = count_parameters(config, params.lora)
    dtype = get_preset(preset_name).torch_dtype
    train: TrainConfig = params.train
    common = dict(
        weight_bytes=DTYPE_BYTES[dtype],
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        batch_size=train.per_device_train_batch_size,
        sequence_length=sequence_length or params.format.max_length,
        eight_bit_optimizer=train.optim.endswith("8bit"),
    )
    with_ckpt = lora_memory(counts["total_params"], counts["trainable_params"], gradient_checkpointing=True, **common)
    without = lora_memory(counts["total_params"], counts["trainable_params"], gradient_checkpointing=False, **common)
    full = full_finetune_memory(counts["total_params"])
    return {
        "preset": preset_name,
        "dtype": dtype,
        **counts,
        "batch_size": common["batch_size"],
        "sequence_length": common["sequence_length"],
        "memory_gib": {
            "lora_with_gradient_checkpointing": {**asdict(with_ckpt), "total_gib": with_ckpt.total_gib},
            "lora_without_gradient_checkpointing": {**asdict(without), "total_gib": without.total_gib},
            "full_finetune_without_activations": {**asdict(full), "total_gib": full.total_gib},
        },
    }


def check_fits(report: dict[str, Any], gpu_memory_gib: float, gradient_checkpointing: bool) -> None:
    """Raise when the LoRA estimate exceeds the declared GPU memory, with the numbers that say why."""
    key = "lora_with_gradient_checkpointing" if gradient_checkpointing else "lora_without_gradient_checkpointing"
    estimate = report["memory_gib"][key]
    if estimate["total_gib"] > gpu_memory_gib:
        terms = ", ".join(f"{name[:-4]} {value:.1f}" for name, value in estimate.items() if name != "total_gib")
        raise RuntimeError(
            f"training {report['preset']} needs about {estimate['total_gib']:.1f} GiB ({terms} GiB) but the GPU "
            f"has {gpu_memory_gib:.1f} GiB: lower train.per_device_train_batch_size or format.max_length, turn on "
            "train.gradient_checkpointing, or use a larger GPU"
        )


def render_plan(report: dict[str, Any], gpu_memory_gib: float | None = None) -> str:
    lines = [
        f"preset {report['preset']} ({report['dtype']}), batch {report['batch_size']} x {report['sequence_length']}"
        " tokens",
        f"total parameters      {report['total_params'] / 1e9:10.3f} B",
        f"trainable (LoRA)      {report['trainable_params'] / 1e6:10.3f} M",
    ]
    lines += [f"  {block:<20}{count / 1e6:10.3f} M" for block, count in report["trainable_params_by_block"].items()]
    lines.append("estimated peak training memory (GiB):")
    for name, estimate in report["memory_gib"].items():
        verdict = ""
        if gpu_memory_gib is not None and name.startswith("lora"):
            verdict = "  fits" if estimate["total_gib"] <= gpu_memory_gib else "  DOES NOT FIT"
        lines.append(f"  {name:<36}{estimate['total_gib']:10.1f}{verdict}")
    return "\n".join(lines)
