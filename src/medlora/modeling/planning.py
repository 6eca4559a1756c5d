"""`medlora plan`: parameter counts and a training-memory estimate before anyone spends GPU hours.

Counts come from the real model built on the meta device (the production preset ships its published config) and
wrapped with the params' LoRA config, routed experts included when `lora.target_parameters` names them. Memory
terms (T = batch x sequence tokens, a = bytes of the preset dtype, bf16: 2), each reported so a user can argue:

- weights: frozen base parameters, a bytes each. LoRA: fp32 weights (PEFT keeps adapters in fp32: they are their own
  master copy), fp32 gradients, AdamW moments 8 bytes/param (8-bit: 2).
- saved activations per block type (`layer_terms`; the CPU torch path is checked against autograd's saved tensors
  in the tests). Every layer: RMSNorm's fp32 upcast (4h); every LoRA site its input copy + a 1-byte dropout mask.
  Mamba-2 with the `mamba_ssm`/`causal_conv1d` kernels: in_proj output (2 d_inner + 2 n_groups ssm_state + n_heads)
  and scan output; conv1d output and fp32 chunk states are recomputed in backward (temporaries). Without them,
  transformers' torch scan saves fp32 H(3P + 3N + 3Q) + 2HPN/Q per token (H heads, P head_dim, N state, Q chunk),
  conv1d in/out, the gated norm's fp32 copies, and materialises broadcast products up to Q*H*N fp32 per token
  (16 GiB per layer at 4 x 1024 on the real model). MoE: router scores, k routed experts (k x (moe_intermediate +
  hidden)), the shared expert; LoRA on routed experts also saves expert inputs and, as PEFT folds W + BA into a full
  expert-stack copy, two copies (up, down) per layer plus one gradient. Attention (sdpa/flash, no seq^2): q, k, v,
  output with GQA. Dense MLP: intermediate activations.
- gradient checkpointing keeps each layer's input (h x a) plus one recomputed layer with its temporaries; without it
  all layers' saved tensors stay and the largest temporary comes on top.
- logits: fp32 (HF upcasts); cross-entropy's backward holds the saved log-softmax, incoming gradient and result:
  3 x T x vocab x 4 bytes. Logits and layer peaks come at different times: the peak phase is the larger.
- allocator: 10% fragmentation on the dynamic terms, plus a fixed 1 GiB CUDA context (kernels, cuBLAS workspace)
  that torch.cuda.max_memory_reserved() does not count: `reserved_gib` is comparable with that measurement,
  `total_gib` with the card.

Full fine-tuning (the seed's first row): weights, gradients (2 bytes) and AdamW moments (8) for every parameter:
30B x 12 bytes = 360 GB.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medlora.core.config import LoraParams, Params
from medlora.modeling.presets import get_preset

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
FRAGMENTATION = 0.10  # reserved / allocated - 1 for the dynamic terms (PyTorch caching allocator)
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS workspace: on the card, outside torch's reserved counter


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float  # saved across the model: every layer's tensors, or the checkpointed layer inputs
    layer_peak_gib: float = 0.0  # one layer recomputed (+ temporaries), or the largest temporaries without ckpt
    logits_gib: float = 0.0
    allocator_gib: float = 0.0
    cuda_context_gib: float = 0.0
    layer_terms_gib: dict[str, float] = field(default_factory=dict, compare=False)  # what the peak layer holds

    @property
    def reserved_gib(self) -> float:
        """What torch.cuda.max_memory_reserved() would report (the peak phase is the larger of layer and logits)."""
        static = self.weights_gib + self.lora_weights_gib + self.gradients_gib + self.optimizer_gib
        return static + self.activations_gib + max(self.layer_peak_gib, self.logits_gib) + self.allocator_gib

    @property
    def total_gib(self) -> float:
        return self.reserved_gib + self.cuda_context_gib

    def as_dict(self) -> dict[str, float]:
        terms = {k: v for k, v in asdict(self).items() if k != "layer_terms_gib"}
        return {**terms, "reserved_gib": self.reserved_gib, "total_gib": self.total_gib}


def layer_counts(config: Any) -> dict[str, int]:
    """Layers per block type from `layers_block_type`; a model without one counts as `transformer` layers."""
    from medlora.modeling.blocks import layer_block_types

    kinds = layer_block_types(config)
    counts = {k: kinds.count(k) for k in ("mamba", "moe", "attention", "mlp") if k in kinds}
    return counts or {"transformer": config.num_hidden_layers}


def layer_terms(
    kind: str, config: Any, lora: LoraParams, *, a: int, tokens: int, sequence_length: int, mamba_kernels: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """(saved, temporary) bytes of one layer of block type `kind` for `tokens` tokens, by named term."""
    c = lambda name, default=0: getattr(config, name, None) or default  # noqa: E731
    targets, mask, t, h = set(lora.target_modules), 1 if lora.lora_dropout > 0 else 0, tokens, config.hidden_size

    def site(name: str, width: int) -> float:  # a LoRA site: its input copy, dropout mask, rank-r activations
        return (width * (a + mask) + 2 * lora.r * a) if name in targets else 0.0

    saved: dict[str, float] = {"block_norm_fp32": t * h * FP32}
    temp: dict[str, float] = {}
    if kind in ("attention", "transformer"):
        heads = c("num_attention_heads")
        head_dim = c("head_dim", h // heads)
        q, kv = heads * head_dim, c("num_key_value_heads", heads) * head_dim
        qkv_sites = sum(site(n, h) for n in ("q_proj", "k_proj", "v_proj"))
        saved["attention_lora_inputs"] = t * (qkv_sites + site("o_proj", q))
        saved["attention_q_k_v_out"] = t * ((2 * q + 2 * kv) * a + heads * FP32)
    if kind in ("mlp", "transformer"):
        i, gated = c("intermediate_size"), kind == "transformer"  # gated: gate_proj and act(gate) * up
        saved["mlp_lora_inputs"] = t * (site("up_proj", h) + site("down_proj", i) + gated * site("gate_proj", h))
        saved["mlp_intermediate"] = t * (1 + 2 * gated) * i * a
    if kind == "moe":
        k, e, i = c("num_experts_per_tok"), c("n_routed_experts"), c("moe_intermediate_size")
        si = c("moe_shared_expert_intermediate_size") * c("n_shared_experts", 1)
        routed = sum(p.rsplit(".", 1)[-1] in ("up_proj", "down_proj") for p in lora.target_parameters)
        saved["router_logits_scores"] = t * (e * (2 * a + 1) + k * (8 + a))
        saved["routed_dispatch_k_experts"] = t * k * (i + h) * a * (2 if routed else 1)
        saved["shared_expert"] = t * (site("up_proj", h) + si * a + site("down_proj", si))
        if routed:  # PEFT's baddbmm folds W + BA: full expert-stack copies, saved for the weight gradient
            saved["routed_lora_merged_experts"] = routed * e * i * h * a
            temp["routed_lora_merged_gradient"] = e * i * h * a
    if kind == "mamba":
        nh, p, n, g, q = map(c, ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "chunk_size"))
        d = nh * p
        conv, proj = d + 2 * g * n, 2 * d + 2 * g * n + nh
        saved["in_proj_lora_input"] = t * site("in_proj", h)
        saved["in_proj_output"] = t * proj * a
        if mamba_kernels:  # fused split-conv1d-scan: saves zxbcdt and the scan output, recomputes the rest
            saved["scan_output"] = t * (d * a + g * FP32)
            temp["conv1d_output_and_grads"] = t * (conv + 2 * d + proj) * a
            temp["chunk_states_fp32"] = t * (nh * p * n / q + g * q + 2 * nh) * FP32
        else:  # transformers' torch_forward + mamba2_chunk_scan reference path
            saved["conv1d_in_out"] = t * 2 * conv * a
            saved["scan_fp32_saved"] = t * (nh * (3 * p + 3 * n + 3 * q) + 2 * nh * p * n / q) * FP32
            saved["gated_norm_fp32"] = t * 4 * d * FP32
            chunks = -(-sequence_length // q)
            widest = max(q * nh * n, q * nh * p, nh * p * n, (chunks + 1) ** 2 * nh * p * n / sequence_length)
            temp["scan_broadcast_product_fp32"] = t * widest * FP32
    return saved, temp


def full_finetune_memory(num_params: float, weight_bytes: int = 2, optimizer_bytes: int = 8) -> MemoryEstimate:
    """The seed's 'Full Fine-tuning Memory = Weights + Gradients + Optimizer States', without activations."""
    return MemoryEstimate(
        weights_gib=num_params * weight_bytes / GIB,
        lora_weights_gib=0.0,
        gradients_gib=num_params * weight_bytes / GIB,
        optimizer_gib=num_params * optimizer_bytes / GIB,
        activations_gib=0.0,
    )


def lora_memory(
    num_params: float,
    trainable_params: float,
    config: Any,
    lora: LoraParams,
    *,
    weight_bytes: int,
    batch_size: int,
    sequence_length: int,
    gradient_checkpointing: bool,
    eight_bit_optimizer: bool = False,
    mamba_kernels: bool = True,
) -> MemoryEstimate:
    """Peak training memory of LoRA on a frozen base (see the module docstring for each term)."""
    tokens, layers = batch_size * sequence_length, layer_counts(config)
    options = dict(a=weight_bytes, tokens=tokens, sequence_length=sequence_length, mamba_kernels=mamba_kernels)
    per_kind = {kind: layer_terms(kind, config, lora, **options) for kind in layers}
    if gradient_checkpointing:  # layer inputs, plus the layer whose recompute (saved + temporaries) is largest
        widest = max(per_kind, key=lambda k: sum(per_kind[k][0].values()) + sum(per_kind[k][1].values()))
        activations = sum(layers.values()) * tokens * config.hidden_size * weight_bytes
        terms = {f"{widest}.{name}": v for name, v in {**per_kind[widest][0], **per_kind[widest][1]}.items()}
    else:  # every layer's saved tensors, plus the largest temporaries of any layer
        widest = max(per_kind, key=lambda k: sum(per_kind[k][1].values()))
        activations = sum(n * sum(per_kind[kind][0].values()) for kind, n in layers.items())
        terms = {f"{kind}.saved_x{n}": n * sum(per_kind[kind][0].values()) for kind, n in layers.items()}
        terms.update({f"{widest}.{name}": v for name, v in per_kind[widest][1].items()})
    layer_peak = sum(per_kind[widest][1].values()) + gradient_checkpointing * sum(per_kind[widest][0].values())
    logits = 3 * tokens * config.vocab_size * FP32
    return MemoryEstimate(
        weights_gib=num_params * weight_bytes / GIB,
        lora_weights_gib=trainable_params * FP32 / GIB,
        gradients_gib=trainable_params * FP32 / GIB,
        optimizer_gib=trainable_params * (2 if eight_bit_optimizer else 8) / GIB,
        activations_gib=activations / GIB,
        layer_peak_gib=layer_peak / GIB,
        logits_gib=logits / GIB,
        allocator_gib=FRAGMENTATION * (activations + max(layer_peak, logits)) / GIB,
        cuda_context_gib=CUDA_CONTEXT_GIB,
        layer_terms_gib={name: v / GIB for name, v in terms.items()},
    )


def parse_memory(text: str) -> float:
    """ "80GiB", "80 GB", "81920MiB" -> GiB (GB is taken as GiB's decimal sibling: 10^9 bytes)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: write it like 80GiB or 24GB")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    factor = {"gib": 1, "gb": 1e9 / GIB, "mib": 1 / 1024, "mb": 1e6 / GIB, "tib": 1024, "tb": 1e12 / GIB}[unit]
    return value * factor


def gpu_memory(declared: str | None = None) -> tuple[float | None, str]:
    """(GiB, source): the declared size (--gpu-memory / train.gpu_memory) wins, else torch's device 0, else None."""
    if declared:
        return parse_memory(declared), f"declared ({declared})"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GIB, f"torch.cuda device 0 ({props.name})"
    return None, "none (no GPU visible and no --gpu-memory / train.gpu_memory)"


def mamba_kernels_available() -> bool:
    """Whether transformers will take the fused CUDA Mamba path (it imports these two packages if installed)."""
    return all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


def preset_config(params: Params, preset_name: str) -> Any:
    """The architecture config of a preset without downloading weights (shipped file, tiny builder, or hub)."""
    from transformers import AutoConfig

    from medlora.modeling.presets import TINY_VOCAB, published_config, tiny_nemotron_h_config

    preset = get_preset(preset_name)
    local = params.model.name_or_path
    if local and Path(local).is_dir():  # a local copy (or the offline replica) is the architecture that will train
        return AutoConfig.from_pretrained(local)
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
    sizes = {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout}
    targets = {"target_modules": list(lora.target_modules), "target_parameters": list(lora.target_parameters) or None}
    peft_model = get_peft_model(model, LoraConfig(**sizes, **targets, task_type="CAUSAL_LM"))
    by_block = trainable_params_by_block(peft_model)
    return {"total_params": total, "trainable_params": sum(by_block.values()), "trainable_params_by_block": by_block}


def plan(
    params: Params,
    preset_name: str | None = None,
    sequence_length: int | None = None,
    mamba_kernels: bool | None = None,
) -> dict[str, Any]:
    """Counts and memory estimates: with/without gradient checkpointing, and with/without the Mamba kernels."""
    import torch

    preset_name = preset_name or params.model.preset
    config = preset_config(params, preset_name)
    counts, layers = count_parameters(config, params.lora), layer_counts(config)
    dtype, train = get_preset(preset_name).torch_dtype, params.train
    if mamba_kernels is not None:
        kernels = {"used": mamba_kernels, "source": "given"}
    elif torch.cuda.is_available():
        found = mamba_kernels_available()
        kernels = {"used": found, "source": "detected" if found else "mamba_ssm/causal_conv1d missing: torch scan"}
    else:
        kernels = {"used": True, "source": "assumed (no GPU here): install mamba_ssm + causal_conv1d on the GPU"}
    batch, length = train.per_device_train_batch_size, sequence_length or params.format.max_length
    sizes = (counts["total_params"], counts["trainable_params"])
    common: dict[str, Any] = {"weight_bytes": DTYPE_BYTES[dtype], "batch_size": batch, "sequence_length": length}
    common["eight_bit_optimizer"] = train.optim.endswith("8bit")
    memory: dict[str, dict[str, float]] = {}
    terms: dict[str, dict[str, float]] = {}
    for k in [kernels["used"]] + ([not kernels["used"]] if "mamba" in layers else []):
        suffix = "" if k == kernels["used"] else ("_mamba_kernels" if k else "_torch_scan")
        for ckpt in (True, False):
            name = f"lora_with{'' if ckpt else 'out'}_gradient_checkpointing{suffix}"
            estimate = lora_memory(*sizes, config, params.lora, gradient_checkpointing=ckpt, mamba_kernels=k, **common)
            memory[name], terms[name] = estimate.as_dict(), estimate.layer_terms_gib
    memory["full_finetune_without_activations"] = full_finetune_memory(counts["total_params"]).as_dict()
    gpu_gib, gpu_source = gpu_memory(train.gpu_memory)
    return {
        **{"preset": preset_name, "dtype": dtype, **counts, "batch_size": batch, "sequence_length": length},
        **{"layers": layers, "mamba_kernels": kernels, "gpu": {"memory_gib": gpu_gib, "source": gpu_source}},
        **{"memory_gib": memory, "layer_terms_gib": terms},
    }


def check_fits(report: dict[str, Any], gpu_memory_gib: float, gradient_checkpointing: bool) -> None:
    """Raise when the LoRA estimate exceeds the declared GPU memory, with the numbers that say why."""
    key = "lora_with_gradient_checkpointing" if gradient_checkpointing else "lora_without_gradient_checkpointing"
    estimate = report["memory_gib"][key]
    if estimate["total_gib"] > gpu_memory_gib:
        terms = ", ".join(f"{k[:-4]} {v:.1f}" for k, v in estimate.items() if k not in ("total_gib", "reserved_gib"))
        raise RuntimeError(
            f"training {report['preset']} needs about {estimate['total_gib']:.1f} GiB ({terms} GiB; peak phase = "
            f"max(layer_peak, logits)) but the GPU has {gpu_memory_gib:.1f} GiB: lower "
            "train.per_device_train_batch_size or format.max_length, turn on train.gradient_checkpointing, or use a "
            "larger GPU"
        )


def render_plan(report: dict[str, Any], gpu_memory_gib: float | None = None) -> str:
    """The plan as text; without `gpu_memory_gib`, the report's GPU memory (declared or read from torch)."""
    gpu = report.get("gpu", {})
    source = "given" if gpu_memory_gib is not None else gpu.get("source", "none")
    gpu_memory_gib = gpu_memory_gib if gpu_memory_gib is not None else gpu.get("memory_gib")
    kernels = report.get("mamba_kernels", {"used": True, "source": "-"})
    lines = [
        f"preset {report['preset']} ({report['dtype']}), batch {report['batch_size']} x {report['sequence_length']}"
        f" tokens, layers {report.get('layers', {})}",
        f"total parameters      {report['total_params'] / 1e9:10.3f} B",
        f"trainable (LoRA)      {report['trainable_params'] / 1e6:10.3f} M",
    ]
    lines += [f"  {block:<20}{count / 1e6:10.3f} M" for block, count in report["trainable_params_by_block"].items()]
    lines.append(f"mamba kernels: {'yes' if kernels['used'] else 'no (torch scan)'} [{kernels['source']}]")
    lines.append(f"GPU memory: {'unknown' if gpu_memory_gib is None else f'{gpu_memory_gib:.1f} GiB'} [{source}]")
    lines.append("estimated peak training memory, GiB (reserved: comparable with torch.cuda.max_memory_reserved()):")
    for name, estimate in report["memory_gib"].items():
        verdict = ""
        if gpu_memory_gib is not None and name.startswith("lora"):
            verdict = "  fits" if estimate["total_gib"] <= gpu_memory_gib else "  DOES NOT FIT"
        reserved = estimate.get("reserved_gib", estimate["total_gib"])
        lines.append(f"  {name:<48}{estimate['total_gib']:8.1f} (reserved {reserved:.1f}){verdict}")
    for name in ("lora_with_gradient_checkpointing", "lora_without_gradient_checkpointing"):
        terms = {k: v for k, v in report["memory_gib"].get(name, {}).items() if k not in ("total_gib", "reserved_gib")}
        layer = report.get("layer_terms_gib", {}).get(name, {})
        lines.append(f"  {name} = static + activations + max(layer_peak, logits) + allocator + cuda_context:")
        lines.append("    " + ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in terms.items()))
        lines.append("    layer_peak / activations by term: " + ", ".join(f"{k} {v:.2f}" for k, v in layer.items()))
    return "\n".join(lines)
