"""Model presets: the embedded tiny NemotronH, the production Nemotron-3-Nano, and any hub/local model.

Every preset ends as a normal Hugging Face model directory (or hub id) loaded through `from_pretrained`, so the
tiny default runs through exactly the code path that loads the real 30B model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.core.config import LoraParams

logger = logging.getLogger(__name__)

# Nemotron-H's LoRA targets: attention q/k/v/o, Mamba in_proj, MoE shared-expert up/down. Never out_proj or
# conv1d (PEFT refuses them on Mamba models; the fused GPU kernel reads out_proj.weight directly).
NEMOTRON_H_TARGETS: tuple[str, ...] = LoraParams().target_modules  # params.yaml's default is this list
ROUTED_EXPERT_PARAMETERS: tuple[str, ...] = ("mixer.experts.up_proj", "mixer.experts.down_proj")


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None  # None: built in-process
    revision: str | None
    torch_dtype: str
    target_modules: tuple[str, ...]
    primary_metric: str  # evaluate.primary_metric when params say "auto"
    description: str
    architecture_config: str | None = None  # file in medlora/assets: the published config.json, for meta builds


PRESETS: dict[str, Preset] = {
    "tiny-nemotron-h": Preset(
        name="tiny-nemotron-h",
        hub_id=None,
        revision=None,
        torch_dtype="float32",
        target_modules=NEMOTRON_H_TARGETS,
        # A random-init tiny model learns the answer's form, not the facts: its honest metric is the held-out
        # answer log-likelihood (see README, "What the tiny preset can and cannot show").
        primary_metric="medmcqa_chat_loglik/answer_loglik",
        description="NemotronH built from a config in-process (Mamba-2 + MoE + attention), random weights",
    ),
    "nemotron-3-nano-30b-a3b": Preset(
        name="nemotron-3-nano-30b-a3b",
        hub_id="nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16",
        # A commit of the hub repo (a branch name would move under us). Taken from public scripts that pin
        # this snapshot; not checked against the hub from this offline machine.
        revision="97ab8012882a655dc38df4fee47422aca9caca07",
        torch_dtype="bfloat16",
        target_modules=NEMOTRON_H_TARGETS,
        primary_metric="medmcqa_chat/acc",
        description="NVIDIA Nemotron-3-Nano-30B-A3B base, bf16 (52 layers: 23 Mamba-2, 23 MoE, 6 attention)",
        architecture_config="nemotron-3-nano-30b-a3b.config.json",
    ),
    "hub": Preset(
        name="hub",
        hub_id=None,  # model.name_or_path
        revision=None,
        torch_dtype="bfloat16",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        primary_metric="medmcqa_chat/acc",
        description="any hub id or local directory named by model.name_or_path, with its own target list",
    ),
}

# The tiny model keeps every block type of the real one, in the real pattern "MEM*EME":
# linear_attention = Mamba-2, moe = routed + shared experts, full_attention = attention.
TINY_LAYERS: tuple[str, ...] = (
    "linear_attention",
    "moe",
    "linear_attention",
    "full_attention",
    "moe",
    "linear_attention",
    "moe",
)
TINY_HIDDEN = 64
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_VOCAB = 2048


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def tiny_nemotron_h_config(vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> Any:
    """A NemotronHConfig with the real model's block types at laptop size (about 0.3M parameters)."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        layers_block_type=list(TINY_LAYERS),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        conv_kernel=4,
        expand=1,
        # The torch Mamba scan (CPU, no mamba_ssm) at batch 16 x ~100 tokens: 16 is about 3.7x faster a training step
        # than 64 and 1.6x faster than 8 at max_length 256, same loss (benchmarks/mamba_chunk_size.py).
        chunk_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=64,
        n_group=1,
        topk_group=1,
        max_position_embeddings=1024,
        # The default 0.02 is sized for hidden sizes in the thousands: at 64 it caps the frozen lm_head's
        # logits near 1.3 and the loss cannot fall below ~6. 1/sqrt(hidden) lowers that floor.
        initializer_range=1 / math.sqrt(TINY_HIDDEN),
        tie_word_embeddings=False,
        use_mamba_kernels=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def published_config(name: str) -> Any:
    """The architecture config a preset ships (its published config.json), as a transformers config object.

    Lets the 30B model be built on the meta device (parameter counts, LoRA coverage, memory plans) with nothing
    downloaded. Raises ValueError when the preset ships none.
    """
    import json

    from transformers import AutoConfig

    preset = get_preset(name)
    if preset.architecture_config is None:
        raise ValueError(f"model.preset {name!r} ships no architecture config")
    raw = json.loads((ASSETS_DIR / preset.architecture_config).read_text(encoding="utf-8"))
    return AutoConfig.for_model(raw.pop("model_type"), **raw)
