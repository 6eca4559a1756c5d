"""`medlora plan`: counts from the real architecture on the meta device, and the seed's memory table."""

from __future__ import annotations

import pytest

from medlora.core.config import parse_params
from medlora.modeling.planning import (
    GIB,
    check_fits,
    full_finetune_memory,
    lora_memory,
    parse_memory,
    plan,
    render_plan,
)

GB = 1e9


def test_seed_table_full_finetune_of_30b_is_360_gb():
    # Seed: 30B x 2 bytes (weights) + 30B x 2 bytes (gradients) + 30B x 8 bytes (optimizer) = ~360 GB
    estimate = full_finetune_memory(30e9)
    assert estimate.total_gib * GIB / GB == pytest.approx(360.0)
    assert estimate.weights_gib * GIB / GB == pytest.approx(60.0)
    assert estimate.optimizer_gib * GIB / GB == pytest.approx(240.0)


def test_seed_table_lora_r16_of_30b_is_about_60_gb_and_6x_less():
    # Seed: LoRA (rank=16) ~30M trainable -> ~60 GB (the frozen bf16 weights dominate); "6x less".
    estimate = lora_memory(
        30e9,
        30e6,
        weight_bytes=2,
        hidden_size=2688,
        num_layers=52,
        vocab_size=131072,
        batch_size=1,
        sequence_length=1,
        gradient_checkpointing=True,
    )
    without_activations = estimate.total_gib - estimate.activations_gib - estimate.logits_gib
    assert 60.0 <= without_activations * GIB / GB <= 61.0
    assert full_finetune_memory(30e9).total_gib / without_activations == pytest.approx(6.0, rel=0.02)


def test_gradient_checkpointing_shrinks_activations_and_batch_grows_them():
    common = dict(weight_bytes=2, hidden_size=2688, num_layers=52, vocab_size=131072, sequence_length=2048)
    small = lora_memory(31.6e9, 11e6, batch_size=1, gradient_checkpointing=False, **common)
    large = lora_memory(31.6e9, 11e6, batch_size=4, gradient_checkpointing=False, **common)
    checkpointed = lora_memory(31.6e9, 11e6, batch_size=4, gradient_checkpointing=True, **common)
    assert large.activations_gib == pytest.approx(4 * small.activations_gib)
    assert checkpointed.activations_gib < large.activations_gib / 10


def test_production_plan_counts_match_the_published_architecture():
    params = parse_params({"model": {"preset": "nemotron-3-nano-30b-a3b"}})
    report = plan(params)
    # FINDINGS: 31.58B parameters; LoRA r=16 on attention + in_proj + shared experts trains 11.4M.
    assert report["total_params"] / 1e9 == pytest.approx(31.58, abs=0.01)
    assert report["trainable_params"] / 1e6 == pytest.approx(11.4, abs=0.1)
    blocks = report["trainable_params_by_block"]
    assert blocks["attention"] / 1e6 == pytest.approx(1.9, abs=0.05)
    assert blocks["mamba"] > 0 and blocks["moe_shared_expert"] > 0 and blocks["moe_routed_experts"] == 0
    weights = report["memory_gib"]["lora_with_gradient_checkpointing"]["weights_gib"]
    assert weights == pytest.approx(58.8, abs=0.1)  # FINDINGS: about 58.8 GiB of bf16 weights
    assert "DOES NOT FIT" in render_plan(report, gpu_memory_gib=40.0)


def test_training_refuses_to_start_when_the_estimate_exceeds_declared_memory():
    params = parse_params({"model": {"preset": "nemotron-3-nano-30b-a3b"}})
    report = plan(params)
    with pytest.raises(RuntimeError, match=r"needs about \d+\.\d GiB .* but the GPU has 40\.0 GiB"):
        check_fits(report, 40.0, gradient_checkpointing=True)
    check_fits(report, 192.0, gradient_checkpointing=False)  # an H200 holds it


def test_tiny_preset_plan_is_small():
    report = plan(parse_params({}))
    assert report["total_params"] < 1_000_000
    assert set(report["trainable_params_by_block"]) >= {"mamba", "attention", "moe_shared_expert"}


@pytest.mark.parametrize(
    ("text", "gib"), [("80GiB", 80.0), ("80 GB", 80e9 / GIB), ("81920MiB", 80.0), ("1TiB", 1024.0), ("24", 24.0)]
)
def test_parse_memory(text, gib):
    assert parse_memory(text) == pytest.approx(gib)


def test_parse_memory_rejects_garbage():
    with pytest.raises(ValueError, match="80GiB"):
        parse_memory("eighty gigs")


def test_train_stage_refuses_before_loading_weights_when_declared_memory_is_too_small():
    from medlora.training.train import refuse_if_over_memory

    params = parse_params({"train": {"gpu_memory": "1MiB"}})
    with pytest.raises(RuntimeError, match=r"but the GPU has 0\.0 GiB"):
        refuse_if_over_memory(params)
    refuse_if_over_memory(parse_params({"train": {"gpu_memory": "1GiB"}}))  # the tiny model fits in 1 GiB


def test_production_params_fit_the_gpu_they_declare():
    from tests.conftest import PROJECT_ROOT

    from medlora.core.config import load_params
    from medlora.training.train import refuse_if_over_memory

    refuse_if_over_memory(load_params(PROJECT_ROOT / "configs" / "nemotron-3-nano-30b-a3b.yaml"))
