"""Which block type of a hybrid model a parameter belongs to: Mamba-2, attention, MoE shared or routed experts.

Block types: `mamba` (Mamba-2 mixers: in_proj), `attention` (q/k/v/o), `moe_shared_expert` (shared_experts.*),
`moe_routed_experts` (mixer.experts.* through target_parameters), `mlp` (dense MLP layers), `other`. A parameter
is classified by its module path and the block type its layer has in `model.config.layers_block_type`. The
coverage gate (training/coverage.py) and `medlora plan` (planning.py) both count by these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

BLOCK_TYPES: tuple[str, ...] = ("mamba", "attention", "moe_shared_expert", "moe_routed_experts", "mlp", "other")

# layers_block_type values (new names and the older pattern letters' names) -> our block types.
LAYER_KINDS: dict[str, str] = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "moe": "moe",
    "mlp": "mlp",
}

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_block_types(config: Any) -> list[str]:
    """Our block type for every layer index, from `config.layers_block_type` (empty when the model has none)."""
    kinds = getattr(config, "layers_block_type", None) or []
    return [LAYER_KINDS.get(str(kind), "other") for kind in kinds]


def block_type_of(name: str, layer_types: Sequence[str]) -> str:
    """The block type a parameter belongs to, from its dotted name and its layer's block type."""
    if "shared_experts." in name:
        return "moe_shared_expert"
    if ".experts." in name:
        return "moe_routed_experts"
    match = _LAYER_INDEX.search(name)
    if match is None or int(match.group(1)) >= len(layer_types):
        return "other"
    kind = layer_types[int(match.group(1))]
    # A moe layer's router (gate) is neither expert; anything else under it counts as other.
    return kind if kind in ("mamba", "attention", "mlp") else "other"


def count_by_block(named_parameters: Iterable[tuple[str, Any]], layer_types: Sequence[str]) -> dict[str, int]:
    """Number of elements per block type (every type listed, zeros included) over `named_parameters`."""
    counts = dict.fromkeys(BLOCK_TYPES, 0)
    for name, parameter in named_parameters:
        counts[block_type_of(name, layer_types)] += parameter.numel()
    return counts


def trainable_params_by_block(model: Any) -> dict[str, int]:
    """Trainable parameters per block type of a (PEFT-wrapped) model."""
    layer_types = layer_block_types(model.config)
    return count_by_block(((n, p) for n, p in model.named_parameters() if p.requires_grad), layer_types)


def params_by_block(model: Any) -> dict[str, int]:
    """All parameters per block type: which block types the model has at all."""
    return count_by_block(model.named_parameters(), layer_block_types(model.config))
