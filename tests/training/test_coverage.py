"""The LoRA coverage gate on the tiny NemotronH: what each target list really trains, per block type."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medlora.modeling.blocks import block_type_of, params_by_block, trainable_params_by_block
from medlora.modeling.presets import NEMOTRON_H_TARGETS, ROUTED_EXPERT_PARAMETERS, TINY_LAYERS
from medlora.training.coverage import (
    CoverageError,
    GradientCoverageCallback,
    check_coverage,
    check_gradients,
    require_coverage,
)

R = 4
LAYER_TYPES = ["mamba" if k == "linear_attention" else "attention" if k == "full_attention" else k for k in TINY_LAYERS]


def peft_model(base_dir, target_modules, target_parameters=(), dropout=0.0):
    from peft import LoraConfig, get_peft_model

    from medlora.modeling.base_model import load_base_model

    model, _ = load_base_model(base_dir)
    config = LoraConfig(
        r=R,
        lora_alpha=2 * R,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        target_parameters=list(target_parameters) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def expected_linear_lora(base_dir, leaf_names, path_filter) -> int:
    """r * (in + out) summed over the base's Linear modules a target list wraps: the count LoRA must add."""
    from medlora.modeling.base_model import load_base_model

    model, _ = load_base_model(base_dir)
    return sum(
        R * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaf_names and path_filter(name)
    )


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("base_model.model.model.layers.0.mixer.in_proj.lora_A.default.weight", "mamba"),
        ("base_model.model.model.layers.3.mixer.q_proj.lora_B.default.weight", "attention"),
        ("base_model.model.model.layers.1.mixer.shared_experts.up_proj.lora_A.default.weight", "moe_shared_expert"),
        ("base_model.model.model.layers.4.mixer.experts.lora_A.default.weight", "moe_routed_experts"),
        ("base_model.model.model.layers.4.mixer.gate.weight", "other"),  # the router belongs to no expert
        ("base_model.model.lm_head.weight", "other"),
        ("base_model.model.model.layers.99.mixer.in_proj.weight", "other"),  # beyond the layer list
    ],
)
def test_block_type_of_uses_path_and_layer_type(name, block):
    assert block_type_of(name, LAYER_TYPES) == block


def test_default_targets_cover_mamba_attention_and_shared_expert_with_exact_counts(tiny_base_dir):
    model = peft_model(tiny_base_dir, NEMOTRON_H_TARGETS)
    counts = trainable_params_by_block(model)
    assert counts["mamba"] == expected_linear_lora(tiny_base_dir, {"in_proj"}, lambda n: True)
    assert counts["attention"] == expected_linear_lora(tiny_base_dir, {"q_proj", "k_proj", "v_proj", "o_proj"}, bool)
    assert counts["moe_shared_expert"] == expected_linear_lora(
        tiny_base_dir, {"up_proj", "down_proj"}, lambda n: "shared_experts" in n
    )
    # Routed experts are 3-D parameters: target_modules never reaches them, and nothing else is trainable.
    assert counts["moe_routed_experts"] == 0 and counts["mlp"] == 0 and counts["other"] == 0
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    verdict = check_coverage(counts, ("mamba", "attention", "moe_shared_expert"), params_by_block(model))
    assert verdict.passed and verdict.missing == ()


def test_target_list_missing_in_proj_fails_the_gate_naming_mamba(tiny_base_dir):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # looks complete, misses Mamba
    model = peft_model(tiny_base_dir, targets)
    counts = trainable_params_by_block(model)
    assert counts["mamba"] == 0 and counts["attention"] > 0
    verdict = check_coverage(counts, ("mamba", "attention", "moe_shared_expert"), params_by_block(model), targets)
    assert not verdict.passed and verdict.missing == ("mamba",)
    with pytest.raises(CoverageError, match=r"gives no trainable parameters to mamba blocks.*in_proj.*out_proj/conv1d"):
        require_coverage(verdict)


def test_attention_only_list_misses_mamba_and_shared_expert(tiny_base_dir):
    counts = trainable_params_by_block(peft_model(tiny_base_dir, ["q_proj", "v_proj"]))
    verdict = check_coverage(counts, ("mamba", "attention", "moe_shared_expert"))
    assert verdict.missing == ("mamba", "moe_shared_expert")


def test_routed_experts_count_only_through_target_parameters(tiny_base_dir):
    model = peft_model(tiny_base_dir, NEMOTRON_H_TARGETS, ROUTED_EXPERT_PARAMETERS)
    counts = trainable_params_by_block(model)
    # PEFT's LoRA on a 3-D (experts, in, out) parameter has r x experts rows: experts * r * (in + out) each.
    moe_layers = sum(1 for kind in TINY_LAYERS if kind == "moe")
    experts = model.config.n_routed_experts
    per_parameter = experts * R * (model.config.hidden_size + model.config.moe_intermediate_size)
    assert counts["moe_routed_experts"] == moe_layers * len(ROUTED_EXPERT_PARAMETERS) * per_parameter
    assert check_coverage(counts, ("moe_routed_experts",)).passed


def test_block_the_model_lacks_is_reported_as_absent_not_as_a_target_problem(tiny_base_dir):
    model = peft_model(tiny_base_dir, NEMOTRON_H_TARGETS)
    verdict = check_coverage(trainable_params_by_block(model), ("attention", "mlp"), params_by_block(model))
    assert not verdict.passed and verdict.absent == ("mlp",) and verdict.missing == ()
    assert "remove 'mlp' from lora.required_blocks" in verdict.message


def test_unknown_required_block_is_refused():
    with pytest.raises(ValueError, match="unknown block type 'mamba2'"):
        check_coverage({"mamba": 1}, ("mamba2",))


def test_check_gradients_names_the_block_with_zero_or_nan_gradient():
    verdict = check_gradients({"mamba": 0.0, "attention": 0.5, "moe_shared_expert": float("nan")}, ["mamba"], 1)
    assert not verdict.passed and verdict.zero_grad_blocks == ("mamba",)
    verdict = check_gradients({"mamba": 0.1, "attention": float("inf")}, ["mamba", "attention"], 1)
    assert not verdict.passed and "attention adapter gradient is not finite" in verdict.message
    assert check_gradients({"mamba": 0.1, "attention": 0.2}, ["mamba", "attention"], 1).passed


def test_gradient_callback_passes_real_backward_and_fails_when_a_block_gets_no_gradient(tiny_base_dir):
    model = peft_model(tiny_base_dir, NEMOTRON_H_TARGETS)
    ids = torch.randint(5, 200, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    targeted = ["mamba", "attention", "moe_shared_expert"]
    callback = GradientCoverageCallback(targeted)
    callback.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=model)
    assert callback.verdict.passed and all(callback.verdict.grad_norm_by_block[b] > 0 for b in targeted)

    for name, parameter in model.named_parameters():
        if "in_proj.lora_" in name:  # the Mamba adapters, as if their path were cut from the loss
            parameter.grad = torch.zeros_like(parameter)
    with pytest.raises(CoverageError, match="mamba adapter weights got an all-zero gradient"):
        GradientCoverageCallback(targeted).on_pre_optimizer_step(
            None, SimpleNamespace(global_step=0), None, model=model
        )
