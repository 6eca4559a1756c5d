"""The LoRA coverage gate: which block types of the model does the adapter actually train?

On NemotronH a target list can look reasonable and still train nothing where it matters: PEFT's default wraps
attention only (6 of 52 layers in the real model), `out_proj`/`conv1d` are refused on Mamba layers, and routed
experts are 3-D parameters that only `target_parameters` reaches. So before training we count trainable
parameters per block type and fail when a type the params require gets none; after the first optimizer step we
check that every targeted type's adapter weights received a nonzero gradient.

Block types and how a parameter is classified: modeling/blocks.py.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainerCallback

from medlora.core.contracts import Report, StageFailed
from medlora.modeling.blocks import (
    BLOCK_TYPES,
    block_type_of,
    layer_block_types,
)

logger = logging.getLogger(__name__)

# What to add to the params when a block type gets nothing (NemotronH names; see FINDINGS).
HINTS: dict[str, str] = {
    "mamba": "NemotronH's Mamba projection is in_proj; out_proj/conv1d are refused by PEFT",
    "attention": "attention projections are q_proj k_proj v_proj o_proj",
    "moe_shared_expert": "the MoE shared expert's projections are up_proj down_proj (mixer.shared_experts.*)",
    "moe_routed_experts": "routed experts are 3-D parameters, not Linear layers: set lora.target_parameters "
    "[mixer.experts.up_proj, mixer.experts.down_proj] (needs lora_dropout 0)",
    "mlp": "dense MLP layers' projections are up_proj down_proj",
    "other": "",
}


class CoverageError(StageFailed):
    """A block type the params require gets no trainable parameters, or got no gradient."""


@dataclass(frozen=True)
class CoverageVerdict:
    passed: bool
    required_blocks: tuple[str, ...]
    missing: tuple[str, ...]  # required, present in the model, but no trainable parameters
    absent: tuple[str, ...]  # required, but the model has no such block at all
    message: str

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # as it is in reports/train.json (lists, not tuples)


def check_coverage(
    counts: dict[str, int],
    required_blocks: Sequence[str],
    present: dict[str, int] | None = None,
    target_modules: Sequence[str] = (),
) -> CoverageVerdict:
    """Does every required block type get trainable parameters? Pure: counts in, verdict out.

    `present` (all parameters per block type) separates a target list that misses a block type from a model
    that has no such block (a Llama has no Mamba: then `lora.required_blocks` is wrong, not the targets).
    """
    unknown = [block for block in required_blocks if block not in BLOCK_TYPES]
    if unknown:
        raise ValueError(f"lora.required_blocks: unknown block type {unknown[0]!r} (known: {', '.join(BLOCK_TYPES)})")
    absent = tuple(b for b in required_blocks if present is not None and present.get(b, 0) == 0)
    missing = tuple(b for b in required_blocks if counts.get(b, 0) == 0 and b not in absent)
    problems = [
        f"lora.target_modules {list(target_modules)} gives no trainable parameters to {block} blocks; {HINTS[block]}"
        for block in missing
    ]
    problems += [f"the model has no {block} blocks: remove {block!r} from lora.required_blocks" for block in absent]
    trained = {block: count for block, count in counts.items() if count}
    message = "; ".join(problems) if problems else f"every required block type is trained: {trained}"
    return CoverageVerdict(not problems, tuple(required_blocks), missing, absent, message)


def require_coverage(verdict: CoverageVerdict, report: Report | None = None) -> None:
    """Raise CoverageError with the verdict's message (and the stage report, still written) when it failed."""
    if not verdict.passed:
        raise CoverageError(f"LoRA coverage gate failed: {verdict.message}", report)


@dataclass(frozen=True)
class GradientVerdict:
    passed: bool
    step: int
    grad_norm_by_block: dict[str, float]
    zero_grad_blocks: tuple[str, ...] = field(default=())
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # as it is in reports/train.json (lists, not tuples)


def check_gradients(grad_norm_by_block: dict[str, float], targeted: Sequence[str], step: int) -> GradientVerdict:
    """Every targeted block type must have a nonzero, finite adapter gradient norm. Pure."""
    zero = tuple(b for b in targeted if not grad_norm_by_block.get(b, 0.0) > 0.0)
    non_finite = tuple(b for b in targeted if not math.isfinite(grad_norm_by_block.get(b, 0.0)))
    problems = [f"{b} adapter weights got an all-zero gradient (they would never train)" for b in zero]
    problems += [f"{b} adapter gradient is not finite" for b in non_finite if b not in zero]
    message = "; ".join(problems) if problems else f"every targeted block type got a gradient: {sorted(targeted)}"
    return GradientVerdict(not problems, step, grad_norm_by_block, zero + non_finite, message)


def adapter_grad_norms(model: Any) -> dict[str, float]:
    """L2 norm of the gradients on LoRA weights (lora_A/lora_B...), per block type; missing grads count as 0."""
    layer_types = layer_block_types(model.config)
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or "lora_" not in name:
            continue
        block = block_type_of(name, layer_types)
        grad = parameter.grad
        value = 0.0 if grad is None else float(grad.detach().float().pow(2).sum())
        squares[block] = squares.get(block, 0.0) + value
    return {block: math.sqrt(value) for block, value in squares.items()}


class GradientCoverageCallback(TrainerCallback):
    """At the first optimizer step, checks that every targeted block type's adapter weights got a gradient.

    lora_B starts at zero, so lora_A's first gradient is zero by construction: a block type passes when any of
    its LoRA weights (in practice lora_B) has a nonzero gradient. Raises CoverageError (stopping training) when a
    targeted type has none; the verdict is kept in `self.verdict` for reports/train.json.
    """

    def __init__(self, targeted: Sequence[str]) -> None:
        self.targeted = tuple(targeted)
        self.verdict: GradientVerdict | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.verdict is not None or model is None:
            return control
        self.verdict = check_gradients(adapter_grad_norms(model), self.targeted, state.global_step + 1)
        if not self.verdict.passed:
            raise CoverageError(f"LoRA gradient check failed at the first optimizer step: {self.verdict.message}")
        logger.info("gradient check: %s", self.verdict.message)
        return control
