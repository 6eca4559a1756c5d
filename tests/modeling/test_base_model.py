"""The `model` stage: presets, the tiny NemotronH and its tokenizer, the hub boundary, the production reference."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, example_rows
from medlora.core.config import ModelConfig
from medlora.core.io import directory_hash
from medlora.modeling.base_model import (
    BASE_REFERENCE_FILE,
    BaseModelUnavailable,
    build_base_model,
    build_tiny_model,
    load_base_model,
    read_base_reference,
    resolve_name_or_path,
    tokenizer_corpus,
)
from medlora.modeling.presets import NEMOTRON_H_TARGETS, ROUTED_EXPERT_PARAMETERS, get_preset, published_config
from medlora.modeling.prompts import ANSWER_PREFIX, answer_choices, prompt_messages, training_messages
from medlora.modeling.tokenizer import CHATML_TEMPLATE, answer_letter_tokens, train_chat_tokenizer

PRODUCTION = "nemotron-3-nano-30b-a3b"


def test_unknown_preset_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'tiny-nemotron' \(known: tiny-nemotron-h, "):
        get_preset("tiny-nemotron")
    with pytest.raises(ValueError, match="unknown preset"):
        build_base_model(ModelConfig(preset="llama"), example_rows(4), Path("unused"))


def test_hub_preset_needs_a_name():
    with pytest.raises(ValueError, match=r"needs model\.name_or_path"):
        resolve_name_or_path(ModelConfig(preset="hub"))


def test_tiny_model_has_every_block_type_of_the_real_one(tiny_base_dir):
    model, _ = load_base_model(tiny_base_dir)
    assert set(model.config.layers_block_type) == {"linear_attention", "moe", "full_attention"}
    names = {name for name, _ in model.named_modules()}
    params = dict(model.named_parameters())
    kinds = Counter(type(model.model.layers[i].mixer).__name__ for i in range(len(model.model.layers)))
    assert kinds == {"NemotronHMamba2Mixer": 3, "NemotronHMoE": 3, "NemotronHAttention": 1}
    assert any(name.endswith("mixer.in_proj") for name in names)  # Mamba-2
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):  # attention
        assert any(name.endswith(f"mixer.{projection}") for name in names)
    assert any(name.endswith("mixer.shared_experts.up_proj") for name in names)  # MoE shared expert
    routed = [p for name, p in params.items() if name.endswith(ROUTED_EXPERT_PARAMETERS)]
    assert routed and all(p.dim() == 3 and p.shape[0] == 4 for p in routed)  # 4 routed experts, 3-D parameters


def test_save_and_reload_through_from_pretrained_gives_identical_logits(tiny_base_dir):
    reloaded, tokenizer = load_base_model(tiny_base_dir)
    fresh = build_tiny_model(tokenizer, ModelConfig().seed)  # the same seed the stage used
    ids = tokenizer.apply_chat_template(training_messages(example_rows(1)[0]), tokenize=True, return_dict=True)
    batch = torch.tensor([ids["input_ids"]])
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, reloaded(batch).logits)
    assert read_base_reference(tiny_base_dir)["num_parameters"] == sum(p.numel() for p in fresh.parameters())


def test_weights_and_tokenizer_are_deterministic_from_the_seed(tmp_path):
    rows = example_rows(60)
    first = build_base_model(ModelConfig(seed=7), rows, tmp_path / "a")
    second = build_base_model(ModelConfig(seed=7), rows, tmp_path / "b")
    other = build_base_model(ModelConfig(seed=8), rows, tmp_path / "c")
    assert first["weights_sha256"] == second["weights_sha256"]
    assert directory_hash(tmp_path / "a") == directory_hash(tmp_path / "b")
    assert other["weights_sha256"] != first["weights_sha256"]
    same_tokenizer = (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "c" / "tokenizer.json"
    ).read_bytes()
    assert same_tokenizer  # the seed moves the weights, not the tokenizer


def test_tokenizer_training_gives_the_same_bytes_in_another_process(tmp_path):
    """Rust hash maps are seeded per process: a tie broken by hash order would show up only across processes."""
    script = (
        "import sys, json; sys.path.insert(0, 'tests')\n"
        "from conftest import example_rows\n"
        "from medlora.modeling.base_model import tokenizer_corpus\n"
        "from medlora.modeling.presets import TINY_VOCAB\n"
        "from medlora.modeling.tokenizer import train_chat_tokenizer\n"
        "print(train_chat_tokenizer(tokenizer_corpus(example_rows(60)), TINY_VOCAB).backend_tokenizer.to_str())\n"
    )
    from medlora.modeling.presets import TINY_VOCAB

    here = train_chat_tokenizer(tokenizer_corpus(example_rows(60)), TINY_VOCAB).backend_tokenizer.to_str()
    there = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert json.loads(there.stdout) == json.loads(here)


def test_chat_template_round_trips_through_auto_tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    row = example_rows(2)[1]
    out = tokenizer.apply_chat_template(
        training_messages(row), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    answer = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(answer) == f"{ANSWER_PREFIX}{answer_choices(row)[1]}<|im_end|>"


def test_answer_letters_are_single_tokens_after_is(tiny_base_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    letters = answer_letter_tokens(tokenizer)
    assert len(set(letters.values())) == 4
    row = example_rows(1)[0]
    context = tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
    for letter, choice in zip("ABCD", answer_choices(row), strict=True):
        ids = tokenizer(context + ANSWER_PREFIX + choice, add_special_tokens=False)["input_ids"]
        prefix = tokenizer(context + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix)] == prefix and ids[len(prefix)] == letters[letter]


def test_a_tokenizer_that_splits_the_letters_is_refused():
    tokenizer = train_chat_tokenizer(["the answer is here"] * 20, vocab_size=300)
    with pytest.raises(ValueError, match="' A' after 'is' is not one token"):
        answer_letter_tokens(tokenizer)


def test_hub_preset_offline_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    start = time.monotonic()
    with pytest.raises(
        BaseModelUnavailable, match=r"NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16@[0-9a-f]{40}.*HF_HUB_OFFLINE"
    ):
        build_base_model(ModelConfig(preset=PRODUCTION), example_rows(4), tmp_path / "base")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "base").exists()


def test_unreachable_hub_fails_fast_instead_of_retrying(tmp_path, monkeypatch):
    """Online mode against a hub that refuses connections (a closed loopback port): one try, a clear message."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(BaseModelUnavailable, match="cannot reach nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16@"):
        build_base_model(ModelConfig(preset=PRODUCTION), example_rows(4), tmp_path / "base")
    assert time.monotonic() - start < 10


def test_hub_preset_accepts_a_local_directory(tiny_base_dir, tmp_path):
    """`model.preset: hub` with a local model: the reference points at it, the weights load from it."""
    reference = build_base_model(
        ModelConfig(preset="hub", name_or_path=str(tiny_base_dir), torch_dtype="float32"), [], tmp_path / "base"
    )
    assert reference["name_or_path"] == str(tiny_base_dir)
    model, tokenizer = load_base_model(tmp_path / "base")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert model.config.layers_block_type == load_base_model(tiny_base_dir)[0].config.layers_block_type
    assert json.loads((tmp_path / "base" / BASE_REFERENCE_FILE).read_text())["weights_sha256"] is None


def test_production_preset_reference():
    preset = get_preset(PRODUCTION)
    assert preset.hub_id == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
    assert preset.revision is not None and len(preset.revision) == 40 and int(preset.revision, 16) >= 0
    assert preset.torch_dtype == "bfloat16"
    assert set(preset.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"}
    assert not {"out_proj", "conv1d", "gate_proj"} & set(preset.target_modules)
    assert ROUTED_EXPERT_PARAMETERS == ("mixer.experts.up_proj", "mixer.experts.down_proj")
    assert resolve_name_or_path(ModelConfig(preset=PRODUCTION)) == (preset.hub_id, preset.revision)
    assert resolve_name_or_path(ModelConfig(preset=PRODUCTION, name_or_path="/models/nano")) == (
        "/models/nano",
        preset.revision,
    )


def test_published_architecture_builds_on_meta_with_the_measured_counts():
    """FINDINGS: 52 layers (23 Mamba, 23 MoE, 6 attention), 31.58B parameters, 29.37B routed, ~3.6B active."""
    from transformers import NemotronHForCausalLM

    config = published_config(PRODUCTION)
    assert Counter(config.layers_block_type) == {"linear_attention": 23, "moe": 23, "full_attention": 6}
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if name.endswith(ROUTED_EXPERT_PARAMETERS))
    per_token = total - routed + routed * config.num_experts_per_tok // config.n_routed_experts
    assert round(total / 1e9, 2) == 31.58
    assert round(routed / 1e9, 2) == 29.37
    assert 3.5e9 < per_token < 3.7e9
    assert round(total * 2 / 2**30, 1) == 58.8  # bf16 bytes, GiB
    linear_suffixes = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(NEMOTRON_H_TARGETS) <= linear_suffixes  # every target exists as a Linear layer
    assert "out_proj" in linear_suffixes  # ...and the one PEFT refuses is there but not targeted


def test_only_the_production_preset_ships_an_architecture_config():
    with pytest.raises(ValueError, match="ships no architecture config"):
        published_config("tiny-nemotron-h")
