"""The offline replica of the hub checkpoint: layout, native loading, hub tensor names, tokenizer traits."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from medlora.modeling.presets import ASSETS_DIR
from medlora.modeling.replica import (
    AUTO_MAP,
    PUBLISHED_CONFIG,
    REMOTE_CODE_ERROR,
    REMOTE_CODE_FILES,
    REPLICA_SIZES,
    SPECIAL_TOKENS,
    build_replica,
)
from medlora.modeling.tokenizer import answer_letter_tokens, has_generation_marks

# The hub checkpoint's float32 tensors: a public measurement of it found 23,552 float32 bytes, exactly these.
HUB_FLOAT32 = (".mixer.A_log", ".mixer.D", ".mixer.gate.e_score_correction_bias")
PUBLISHED = json.loads((ASSETS_DIR / PUBLISHED_CONFIG).read_text(encoding="utf-8"))
MESSAGES = [
    {"role": "user", "content": "Question: Which drug causes cinchonism?\n\nA) Quinine\nB) Aspirin\nC) Digoxin"},
    {"role": "assistant", "content": "The correct answer is A) Quinine."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_replica(tmp_path_factory.mktemp("replica") / "tiny", "tiny")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return build_replica(tmp_path_factory.mktemp("replica") / "small", "small")


def read_shards(directory: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """{tensor name: (shard file, dtype, shape)} over every safetensors file in `directory`."""
    found = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                view = handle.get_slice(name)
                found[name] = (shard.name, view.get_dtype(), tuple(view.get_shape()))
    return found


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in directory.glob("model-*.safetensors"):
        with safe_open(shard, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def hub_names(config: dict) -> set[str]:
    """Every tensor name the hub checkpoint has for `config`, written out from its published naming."""
    mamba = ["A_log", "D", "dt_bias", "conv1d.bias", "conv1d.weight", "in_proj.weight", "norm.weight"]
    router = ["gate.weight", "gate.e_score_correction_bias"]
    experts = [f"experts.{k}.{p}_proj.weight" for k in range(config["n_routed_experts"]) for p in ("up", "down")]
    per_block = {
        "M": [*mamba, "out_proj.weight"],
        "*": [f"{p}_proj.weight" for p in "qkvo"],
        "E": [*router, "shared_experts.up_proj.weight", "shared_experts.down_proj.weight", *experts],
    }
    names = {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i, block in enumerate(config["hybrid_override_pattern"]):
        names |= {f"backbone.layers.{i}.norm.weight"} | {f"backbone.layers.{i}.mixer.{n}" for n in per_block[block]}
    return names


def test_config_has_every_published_key_with_sizes_shrunk(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert set(config) == set(PUBLISHED) | {"auto_map"}
    assert config["auto_map"] == AUTO_MAP
    for key in ("model_type", "architectures", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == PUBLISHED[key], key
    shrunk = set(REPLICA_SIZES["tiny"]) | {"num_hidden_layers", "initializer_range"}
    assert {k: v for k, v in config.items() if k not in shrunk | {"auto_map"}} == {
        k: v for k, v in PUBLISHED.items() if k not in shrunk
    }
    for key in ("hidden_size", "n_routed_experts", "num_hidden_layers", "vocab_size", "mamba_num_heads"):
        assert config[key] < PUBLISHED[key], key
    pattern = config["hybrid_override_pattern"]
    assert PUBLISHED["hybrid_override_pattern"].startswith(pattern) and set(pattern) == {"M", "E", "*"}
    assert config["num_hidden_layers"] == len(pattern)
    assert config["mamba_num_heads"] * config["mamba_head_dim"] == config["expand"] * config["hidden_size"]
    for filename in REMOTE_CODE_FILES:  # the files auto_map names exist, as in the hub repo
        assert REMOTE_CODE_ERROR in (tiny / filename).read_text()


def test_shards_hold_the_hub_tensor_names_in_bf16(tiny):
    config = json.loads((tiny / "config.json").read_text())
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    found = read_shards(tiny)
    shards = sorted(p.name for p in tiny.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert index["weight_map"] == {name: shard for name, (shard, _, _) in found.items()}
    assert set(found) == hub_names(config)  # backbone. prefix, one tensor per routed expert, no 3-D expert tensor
    assert index["metadata"]["total_size"] == sum(
        torch.Size(shape).numel() * (4 if dtype == "F32" else 2) for _, dtype, shape in found.values()
    )
    for name, (_, dtype, _) in found.items():
        assert dtype == ("F32" if name.endswith(HUB_FLOAT32) else "BF16"), name
    expert = found["backbone.layers.1.mixer.experts.0.up_proj.weight"][2]
    assert expert == (config["moe_intermediate_size"], config["hidden_size"])  # a Linear weight: (out, in)


def test_loads_natively_with_every_weight_from_the_files(tiny, monkeypatch, tmp_path):
    import transformers.dynamic_module_utils as dynamic_modules
    from transformers import AutoConfig, AutoModelForCausalLM, NemotronHForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny, output_loading_info=True)  # would raise if stubs ran
    assert type(model) is NemotronHForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(model.config.layers_block_type) == {"linear_attention", "moe", "full_attention"}
    files = load_tensors(tiny)
    for name, tensor in model.state_dict().items():
        hub = name.replace("model.", "backbone.", 1)
        expert = re.fullmatch(r"(.*\.experts)\.(up_proj|down_proj)", hub)
        if expert:  # the conversion merged one tensor per expert into this 3-D parameter
            expected = torch.stack([files[f"{expert[1]}.{k}.{expert[2]}.weight"] for k in range(len(tensor))])
        else:
            expected = files[hub]
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
    assert model.model.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32

    # Positive control: the stubs are what auto_map would run, had trust_remote_code been turned on.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    with pytest.raises(RuntimeError, match=REMOTE_CODE_ERROR):
        AutoConfig.from_pretrained(tiny, trust_remote_code=True)
    for name in set(sys.modules) - before:  # the dynamic-module package now points into tmp_path
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_save_pretrained_of_the_loaded_model_writes_the_hub_layout(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(tmp_path, max_shard_size="300KB")
    replica, saved = read_shards(tiny), read_shards(tmp_path)
    assert {n: s for n, (_, _, s) in saved.items()} == {n: s for n, (_, _, s) in replica.items()}
    # A bf16 load keeps only the router bias in float32: the Mamba A_log and D come back as bf16.
    changed = {name for name in saved if saved[name][1] != replica[name][1]}
    assert changed == {name for name in replica if name.endswith((".mixer.A_log", ".mixer.D"))}
    # The saved config keeps auto_map, but the files it names are not written next to it.
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert not any((tmp_path / filename).exists() for filename in REMOTE_CODE_FILES)


def test_tokenizer_has_the_published_traits(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert tokenizer.pad_token is None
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token) == (1, "<|im_end|>")
    assert json.loads((tiny / "generation_config.json").read_text())["eos_token_id"] == [2, tokenizer.eos_token_id]
    assert len(set(answer_letter_tokens(tokenizer).values())) == 4  # " A".." D" one token each
    assert not has_generation_marks(tokenizer) and "endgeneration" not in tokenizer.chat_template

    def render(messages: list[dict], **kwargs) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = render(MESSAGES)
    assert full.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")  # a system block, though none given
    assert "<|im_start|>assistant\n<think></think>The correct answer is A) Quinine.<|im_end|>\n" in full
    thinking = render(MESSAGES[:1], add_generation_prompt=True)
    direct = render(MESSAGES[:1], add_generation_prompt=True, enable_thinking=False)
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    assert direct.endswith("<|im_start|>assistant\n<think></think>")
    assert ids(full)[: len(ids(direct))] == ids(direct)
    assert ids(full)[: len(ids(thinking))] != ids(thinking)
    reasoned = render([*MESSAGES[:1], {"role": "assistant", "content": "A", "reasoning_content": "cinchona bark"}])
    assert reasoned.endswith("<|im_start|>assistant\n<think>\ncinchona bark\n</think>\nA<|im_end|>\n")


def test_tiny_trains_a_step_on_cpu(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    batch = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False), return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0


def test_both_sizes_build_and_small_is_larger(tiny, small):
    from transformers import AutoModelForCausalLM

    def elements(directory: Path) -> int:  # parameters plus the router-bias buffers
        return sum(torch.Size(shape).numel() for _, _, shape in read_shards(directory).values())

    assert elements(small) > 3 * elements(tiny)
    model, info = AutoModelForCausalLM.from_pretrained(small, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(t.numel() for t in model.state_dict().values()) == elements(small)
    assert len(list(small.glob("model-*.safetensors"))) == 3


def test_same_seed_same_bytes_and_bad_requests_refused(tiny, tmp_path):
    def digest(directory: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    assert digest(build_replica(tmp_path / "again", "tiny")) == digest(tiny)
    other = digest(build_replica(tmp_path / "seed1", "tiny", seed=1))
    assert other["tokenizer.json"] == digest(tiny)["tokenizer.json"]
    assert other["model-00001-of-00002.safetensors"] != digest(tiny)["model-00001-of-00002.safetensors"]
    with pytest.raises(ValueError, match="unknown"):
        build_replica(tmp_path / "huge", "huge")
    with pytest.raises(FileExistsError):
        build_replica(tiny, "tiny")
