"""`medlora plan`: counts from the real architecture on the meta device, and a memory model per block type that is
checked against autograd on CPU and against a published GPU measurement."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

from medlora.core.config import LoraParams, parse_params
from medlora.modeling.planning import (
    GIB,
    check_fits,
    full_finetune_memory,
    gpu_memory,
    layer_counts,
    layer_terms,
    lora_memory,
    parse_memory,
    plan,
    render_plan,
)
from medlora.modeling.presets import published_config

GB = 1e9
REAL = "nemotron-3-nano-30b-a3b"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj")
ROUTED = ("mixer.experts.up_proj", "mixer.experts.down_proj")


@pytest.fixture(scope="module")
def real_config():
    return published_config(REAL)


@pytest.fixture(scope="module")
def production_report():
    from tests.conftest import PROJECT_ROOT

    from medlora.core.config import load_params

    return plan(load_params(PROJECT_ROOT / "configs" / "nemotron-3-nano-30b-a3b.yaml"))


def small_config(**overrides):
    """A NemotronH with every block type (Mamba-2, MoE, attention, dense MLP) small enough for CPU autograd."""
    from transformers import NemotronHConfig

    sizes = dict(vocab_size=512, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    sizes |= dict(intermediate_size=384, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2)
    sizes |= dict(conv_kernel=4, expand=1, chunk_size=32, n_routed_experts=8, num_experts_per_tok=3)
    sizes |= dict(moe_intermediate_size=96, moe_shared_expert_intermediate_size=192, n_group=1, topk_group=1)
    sizes |= dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], tie_word_embeddings=False)
    return NemotronHConfig(**(sizes | overrides))


def test_seed_table_full_finetune_of_30b_is_360_gb():
    # Seed: 30B x 2 bytes (weights) + 30B x 2 bytes (gradients) + 30B x 8 bytes (optimizer) = ~360 GB
    estimate = full_finetune_memory(30e9)
    assert estimate.total_gib * GIB / GB == pytest.approx(360.0)
    assert estimate.weights_gib * GIB / GB == pytest.approx(60.0)
    assert estimate.optimizer_gib * GIB / GB == pytest.approx(240.0)


def test_seed_table_lora_r16_of_30b_is_about_60_gb_and_6x_less(real_config):
    # Seed: LoRA (rank=16) ~30M trainable -> ~60 GB (the frozen bf16 weights dominate); "6x less".
    common = dict(weight_bytes=2, batch_size=1, sequence_length=1, gradient_checkpointing=True)
    estimate = lora_memory(30e9, 30e6, real_config, LoraParams(), **common)
    static = estimate.weights_gib + estimate.lora_weights_gib + estimate.gradients_gib + estimate.optimizer_gib
    assert 60.0 <= static * GIB / GB <= 61.0
    assert full_finetune_memory(30e9).total_gib / static == pytest.approx(6.0, rel=0.02)


def test_layer_types_of_the_real_model_are_counted_from_its_config(real_config):
    assert layer_counts(real_config) == {"mamba": 23, "moe": 23, "attention": 6}


def test_mamba_terms_follow_the_projection_and_the_reference_scan(real_config):
    tokens, lora = 4 * 1024, LoraParams(r=16, lora_dropout=0.0)
    opts = dict(a=2, tokens=tokens, sequence_length=1024)
    kernel_saved, kernel_temp = layer_terms("mamba", real_config, lora, mamba_kernels=True, **opts)
    torch_saved, torch_temp = layer_terms("mamba", real_config, lora, mamba_kernels=False, **opts)
    # in_proj output: 2 d_inner + 2 n_groups ssm_state + n_heads = 2*4096 + 2*8*128 + 64, in bf16
    assert kernel_saved["in_proj_output"] == tokens * 10304 * 2 == torch_saved["in_proj_output"]
    # The reference scan's C x B product: tokens x chunk 128 x 64 heads x 128 state x fp32 = 16 GiB, per layer
    assert torch_temp["scan_broadcast_product_fp32"] / GIB == pytest.approx(16.0)
    assert max(kernel_temp.values()) / GIB < 0.5  # the kernels recompute in SRAM-sized chunks instead
    assert sum(torch_saved.values()) > 5 * sum(kernel_saved.values())


def test_moe_terms_scale_with_top_k_and_attention_has_no_seq_squared(real_config):
    lora, opts = LoraParams(lora_dropout=0.0), dict(a=2, tokens=8192, mamba_kernels=True)
    k6 = layer_terms("moe", real_config, lora, sequence_length=2048, **opts)[0]
    k3_config = published_config(REAL)  # a fresh copy: the fixture's is shared
    k3_config.num_experts_per_tok = 3
    k3 = layer_terms("moe", k3_config, lora, sequence_length=2048, **opts)[0]
    # each token goes through k routed experts: k x (moe_intermediate 1856 + hidden 2688) x bf16
    assert k6["routed_dispatch_k_experts"] == 8192 * 6 * (1856 + 2688) * 2 == 2 * k3["routed_dispatch_k_experts"]
    assert k6["shared_expert"] == k3["shared_expert"] > 0
    short = layer_terms("attention", real_config, lora, sequence_length=512, **opts)[0]
    long = layer_terms("attention", real_config, lora, sequence_length=8192, **opts)[0]
    assert short == long  # same tokens, 16x the sequence: sdpa/flash, no seq^2 term
    assert short["attention_q_k_v_out"] == 8192 * ((2 * 32 * 128 + 2 * 2 * 128) * 2 + 32 * 4)  # GQA: 2 kv heads


def test_a_model_without_layer_types_counts_attention_plus_gated_mlp_layers():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    assert layer_counts(config) == {"transformer": 4}
    saved, _ = layer_terms("transformer", config, LoraParams(lora_dropout=0.0), a=2, tokens=10, sequence_length=10,
                           mamba_kernels=True)  # fmt: skip
    assert saved["mlp_intermediate"] == 10 * 3 * 512 * 2 and saved["attention_q_k_v_out"] > 0


def test_checkpointing_keeps_layer_inputs_plus_one_layer(real_config):
    lora = LoraParams(lora_dropout=0.0)
    common = dict(weight_bytes=2, sequence_length=2048, eight_bit_optimizer=True)
    one = lora_memory(31.6e9, 11e6, real_config, lora, batch_size=1, gradient_checkpointing=False, **common)
    four = lora_memory(31.6e9, 11e6, real_config, lora, batch_size=4, gradient_checkpointing=False, **common)
    ckpt = lora_memory(31.6e9, 11e6, real_config, lora, batch_size=4, gradient_checkpointing=True, **common)
    assert four.activations_gib == pytest.approx(4 * one.activations_gib)
    assert ckpt.activations_gib == pytest.approx(52 * 4 * 2048 * 2688 * 2 / GIB)  # every layer's bf16 input
    assert ckpt.layer_peak_gib == pytest.approx(sum(ckpt.layer_terms_gib.values()))
    assert ckpt.activations_gib + ckpt.layer_peak_gib < four.activations_gib / 5
    assert four.logits_gib == pytest.approx(3 * 8192 * 131072 * 4 / GIB)  # fp32 logits: 12 GiB at 4 x 2048
    assert ckpt.reserved_gib == pytest.approx(ckpt.total_gib - 1.0)  # the CUDA context is outside torch's counter


def test_routed_expert_lora_keeps_full_expert_stack_copies(real_config):
    lora = LoraParams(r=8, lora_dropout=0.0, target_parameters=ROUTED)
    saved, temp = layer_terms("moe", real_config, lora, a=2, tokens=8192, sequence_length=2048, mamba_kernels=True)
    # PEFT folds W + BA into a (128 experts x 1856 x 2688) bf16 copy per projection, saved until backward
    assert saved["routed_lora_merged_experts"] == 2 * 128 * 1856 * 2688 * 2
    assert temp["routed_lora_merged_gradient"] == 128 * 1856 * 2688 * 2


def saved_bytes_by_layer(config, lora: LoraParams, batch: int, seq: int) -> dict[str, int]:
    """What autograd saves per layer type in one bf16-autocast forward on CPU (saved_tensors_hooks, no params)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medlora.modeling.blocks import LAYER_KINDS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    targets = {"target_modules": list(lora.target_modules), "target_parameters": list(lora.target_parameters) or None}
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_dropout=lora.lora_dropout, **targets)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, seen, saved = ["other"], set(), defaultdict(int)
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda m, a, kind=LAYER_KINDS[layer.block_type]: current.__setitem__(0, kind))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, "other"))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params | seen:
            seen.add(storage.data_ptr())
            saved[current[0]] += storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return dict(saved)


@pytest.mark.parametrize("routed", [False, True], ids=["modules", "routed_experts"])
def test_saved_activation_terms_match_autograd_on_a_cpu_nemotron_h(routed):
    # CPU runs transformers' torch scan (no kernels). Dropout 0: CPU dropout keeps fp32 masks, CUDA bool ones.
    config, batch, seq = small_config(), 2, 128
    lora = LoraParams(r=8, lora_dropout=0.0, target_modules=TARGETS, target_parameters=ROUTED if routed else ())
    measured = saved_bytes_by_layer(config, lora, batch, seq)
    for kind in ("mamba", "moe", "attention", "mlp"):
        saved, _ = layer_terms(kind, config, lora, a=2, tokens=batch * seq, sequence_length=seq, mamba_kernels=False)
        assert sum(saved.values()) == pytest.approx(measured[kind], rel=0.10), kind  # measured: within 6%


def test_torch_scan_widest_temporary_is_what_a_forward_backward_allocates():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from transformers import AutoModelForCausalLM

    class Widest(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.bytes = max([self.bytes, *(t.untyped_storage().nbytes() for t in tensors)])
            return out

    config = small_config(layers_block_type=["linear_attention", "full_attention"])
    model, ids = AutoModelForCausalLM.from_config(config), torch.randint(0, 512, (2, 128))
    with Widest() as widest:
        model(input_ids=ids, labels=ids).loss.backward()
    _, temp = layer_terms("mamba", config, LoraParams(), a=4, tokens=256, sequence_length=128, mamba_kernels=False)
    assert widest.bytes == temp["scan_broadcast_product_fp32"]


def test_unsloth_nemotron_3_nano_recipe_against_its_published_a100_measurement():
    """unslothai/notebooks nb/Nemotron-3-Nano-30B-A3B_A100.ipynb (Unsloth 2025.12.5, transformers 4.56.2, remote
    code): get_peft_model(r=8, lora_alpha=16, lora_dropout=0, target_modules=[q,k,v,o,gate,up,down,in_proj,out_proj])
    printed "Trainable parameters = 220,968,448 of 31,798,905,792"; batch 4, max_seq_length 2048, adamw_8bit,
    use_gradient_checkpointing="unsloth"; "59.752 GB of memory reserved" after loading, "Peak reserved memory =
    76.904 GB". Its "GB" is max_memory_reserved() / 1024**3 ("Max memory: 79.318 GB" on an 80 GB card): GiB."""
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(TARGETS)}
    train = {"per_device_train_batch_size": 4, "gradient_checkpointing": True, "optim": "adamw_8bit"}
    params = parse_params(
        {"model": {"preset": REAL}, "lora": lora | {"target_parameters": list(ROUTED)}, "train": train}
    )
    report = plan(params, sequence_length=2048, mamba_kernels=True)
    # The remote-code model has per-expert Linear layers, so up_proj/down_proj reach the routed experts; natively
    # they are 3-D parameters (target_parameters). PEFT refuses out_proj on nemotron_h, which Unsloth wrapped:
    # 23 Mamba layers x r x (d_inner 4096 + hidden 2688) is the whole difference.
    out_proj_lora = 23 * 8 * (4096 + 2688)
    assert report["trainable_params"] == 219_720_192
    assert report["trainable_params"] + out_proj_lora == 220_968_448
    assert report["total_params"] + 220_968_448 == 31_798_905_792
    estimate = report["memory_gib"]["lora_with_gradient_checkpointing"]
    # After loading: bf16 weights + fp32 LoRA weights against the measured 59.752 GiB reserved.
    assert estimate["weights_gib"] + estimate["lora_weights_gib"] == pytest.approx(59.752, rel=0.01)
    # Peak: +-12% (+-9 GiB) of 76.904 GiB, the size of the dynamic terms that the two stacks handle differently:
    # here full fp32 logits (12 GiB at 4 x 2048), checkpoints on the GPU and PEFT's merged expert copies; Unsloth
    # chunks the loss, offloads checkpoints to CPU, uses per-expert LoRA, eager attention and padding-free batches.
    # The comparison bounds the model's scale, not each term. reserved excludes the CUDA context, like the measure.
    assert estimate["reserved_gib"] == pytest.approx(76.904, rel=0.12)


def test_production_plan_counts_match_the_published_architecture(production_report):
    report = production_report
    # FINDINGS: 31.58B parameters; LoRA r=16 on attention + in_proj + shared experts trains 11.4M.
    assert report["total_params"] == 31_577_937_344
    assert report["trainable_params"] / 1e6 == pytest.approx(11.4, abs=0.1)
    blocks = report["trainable_params_by_block"]
    assert blocks["attention"] / 1e6 == pytest.approx(1.9, abs=0.05)
    assert blocks["mamba"] > 0 and blocks["moe_shared_expert"] > 0 and blocks["moe_routed_experts"] == 0
    memory = report["memory_gib"]
    assert memory["lora_with_gradient_checkpointing"]["weights_gib"] == pytest.approx(58.8, abs=0.1)  # bf16
    # Off-GPU the plan assumes the Mamba kernels and shows the torch-scan fallback beside it: 16 GiB more per layer.
    assert report["mamba_kernels"]["used"] is True and "assumed" in report["mamba_kernels"]["source"]
    with_kernels = memory["lora_with_gradient_checkpointing"]["total_gib"]
    assert memory["lora_with_gradient_checkpointing_torch_scan"]["total_gib"] > with_kernels + 10
    assert 60 < with_kernels < 80
    text = render_plan(report, gpu_memory_gib=40.0)
    assert "DOES NOT FIT" in text and "[given]" in text and "mamba.in_proj_output" in text


def test_training_refuses_to_start_when_the_estimate_exceeds_declared_memory(production_report):
    with pytest.raises(RuntimeError, match=r"needs about \d+\.\d GiB .*logits .* but the GPU has 40\.0 GiB"):
        check_fits(production_report, 40.0, gradient_checkpointing=True)
    check_fits(production_report, 192.0, gradient_checkpointing=False)  # an H200 holds it


def test_gpu_memory_comes_from_torch_when_not_declared(monkeypatch):
    import torch

    import medlora.modeling.planning as planning

    assert gpu_memory(None) == (None, "none (no GPU visible and no --gpu-memory / train.gpu_memory)")
    a100 = SimpleNamespace(total_memory=85_166_604_288, name="NVIDIA A100-SXM4-80GB")  # 79.318 GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: a100)
    assert gpu_memory(None) == (pytest.approx(79.318, abs=1e-3), "torch.cuda device 0 (NVIDIA A100-SXM4-80GB)")
    assert gpu_memory("24GiB") == (24.0, "declared (24GiB)")  # a declared size wins
    report = plan(parse_params({}))  # on this "GPU", mamba_ssm is not installed: the torch scan is the headline
    assert report["gpu"]["source"].startswith("torch.cuda") and report["mamba_kernels"]["used"] is False
    assert "lora_with_gradient_checkpointing_mamba_kernels" in report["memory_gib"]
    assert "79.3 GiB [torch.cuda device 0" in render_plan(report)
    monkeypatch.setattr(planning, "mamba_kernels_available", lambda: True)
    assert plan(parse_params({}))["mamba_kernels"] == {"used": True, "source": "detected"}


def test_tiny_preset_plan_is_small():
    report = plan(parse_params({}))
    assert report["total_params"] < 1_000_000
    assert set(report["trainable_params_by_block"]) >= {"mamba", "attention", "moe_shared_expert"}
    assert report["layers"] == {"mamba": 3, "moe": 3, "attention": 1}
    assert report["memory_gib"]["lora_with_gradient_checkpointing"]["reserved_gib"] < 0.5


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
    # the tiny model fits in 2 GiB (1 GiB of it is the CUDA context the plan reserves on any GPU)
    refuse_if_over_memory(parse_params({"train": {"gpu_memory": "2GiB"}}))


def test_production_params_fit_the_gpu_they_declare():
    from tests.conftest import PROJECT_ROOT

    from medlora.core.config import load_params
    from medlora.training.train import refuse_if_over_memory

    refuse_if_over_memory(load_params(PROJECT_ROOT / "configs" / "nemotron-3-nano-30b-a3b.yaml"))
