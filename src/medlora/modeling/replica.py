"""An offline replica of the hub checkpoint nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16, at CPU sizes.

The production preset loads that 59 GiB repository with `from_pretrained`; no test here can download it. A replica
is a directory laid out like the hub repo, so the production code path (native NemotronH, hub tensor names converted
at load, sharded safetensors, a tokenizer without a pad token, a chat template that opens a <think> block) runs
offline in seconds:
- config.json: every key of the published config, sizes shrunk, plus the hub's `auto_map` to remote code;
- configuration_nemotron_h.py / modeling_nemotron_h.py: stubs that raise if imported, so loading the replica proves
  `trust_remote_code` stays off and transformers' own NemotronH is what runs;
- model-0000K-of-0000N.safetensors + model.safetensors.index.json: random weights from a seed under the hub's names
  (`backbone.` prefix, one tensor per routed expert), bf16 except the tensors the hub stores as float32;
- tokenizer.json / tokenizer_config.json / chat_template.jinja: a byte-level BPE trained here with the published
  special tokens at their published ids, no pad token, and a chat template written here that behaves like the
  published one; generation_config.json with the published ids.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HUB_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
PUBLISHED_CONFIG = "nemotron-3-nano-30b-a3b.config.json"
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_nemotron_h.NemotronHConfig",
    "AutoModel": "modeling_nemotron_h.NemotronHForCausalLM",
    "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM",
}
REMOTE_CODE_FILES: tuple[str, ...] = ("configuration_nemotron_h.py", "modeling_nemotron_h.py")
REMOTE_CODE_ERROR = "remote code must never run: medlora loads NemotronH natively"
STUB_SOURCE = '"""Stand-in for the hub repo\'s {filename}: it must never run."""\n\nraise RuntimeError("{error}")\n'
# The published tokenizer's first 18 ids (ids 18.. are <SPECIAL_k> placeholders, left out here to keep the vocab
# small). Same ids, so config.json's bos 1 / eos 2 / pad 0 and generation_config's eos [2, 11] keep their values.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
    "</tool_call>", "<tool_response>", "</tool_response>",
)  # fmt: skip
# Tensors the hub checkpoint stores as float32 (its float32 bytes add up to exactly these, 23,552 B); all else bf16.
FLOAT32_SUFFIXES: tuple[str, ...] = (".mixer.A_log", ".mixer.D", ".mixer.gate.e_score_correction_bias")
TOKENIZER_CORPUS_ROWS = 1000

# Shrunk values; every other key keeps its published value. The layer patterns are prefixes of the published one,
# so each size has Mamba (M), MoE (E) and attention (*) blocks in the real order. mamba_num_heads * mamba_head_dim =
# expand * hidden_size (transformers sizes the Mamba mixer from heads * head_dim alone; the published model has 4096,
# not 2 * 2688). chunk_size 16 is the fastest torch Mamba scan on CPU. vocab_size is the BPE target.
REPLICA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64, "hybrid_override_pattern": "MEMEM*E", "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16,
        "chunk_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
        "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 64, "vocab_size": 2048,
    },
    "small": {
        "hidden_size": 128, "hybrid_override_pattern": "MEMEM*EMEMEM*E", "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 16, "mamba_num_heads": 16, "mamba_head_dim": 16, "n_groups": 4,
        "ssm_state_size": 32, "chunk_size": 16, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "intermediate_size": 96, "moe_intermediate_size": 96, "moe_shared_expert_intermediate_size": 192,
        "vocab_size": 4096,
    },
    # Large enough that the weights (~90 MB) dominate a merge's memory, for benchmarks/merge_memory.py.
    "medium": {
        "hidden_size": 512, "hybrid_override_pattern": "MEMEM*EMEMEM*E", "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 64, "mamba_num_heads": 16, "mamba_head_dim": 64, "n_groups": 8,
        "ssm_state_size": 64, "chunk_size": 16, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "intermediate_size": 256, "moe_intermediate_size": 256, "moe_shared_expert_intermediate_size": 512,
        "vocab_size": 4096,
    },
}  # fmt: skip
REPLICA_SHARDS: dict[str, int] = {"tiny": 2, "small": 3, "medium": 4}

# Behaves like the published template (always a system block, <think></think> before an answer without reasoning,
# reasoning of turns before the last user turn dropped, a generation prompt that opens <think> unless
# enable_thinking is false) and like it has no {% generation %} marks.
CHAT_TEMPLATE = """\
{%- set thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}
{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}
{%- for m in turns -%}
{%- if m['role'] == 'assistant' -%}
{%- set answer = (m['content'] or '') | trim -%}
{%- if m.get('reasoning_content') -%}
{%- set answer = '<think>\\n' + m['reasoning_content'] | trim + '\\n</think>\\n' + answer -%}
{%- elif '</think>' not in answer -%}
{%- set answer = '<think></think>' + answer -%}
{%- endif -%}
{%- if loop.index0 < ns.last_user and '</think>' in answer -%}
{%- set answer = '<think></think>' + answer.split('</think>')[-1] | trim -%}
{%- endif -%}
{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' + ('<think>\\n' if thinking else '<think></think>') -}}
{%- endif -%}"""


def replica_config(size: str, vocab_size: int | None = None) -> dict[str, Any]:
    """config.json of a replica: the published config with `size`'s values and the hub's auto_map."""
    from medlora.modeling.presets import ASSETS_DIR

    if size not in REPLICA_SIZES:
        raise ValueError(f"replica size {size!r} unknown (known: {', '.join(REPLICA_SIZES)})")
    config = json.loads((ASSETS_DIR / PUBLISHED_CONFIG).read_text(encoding="utf-8"))
    config.update(REPLICA_SIZES[size])
    config["num_hidden_layers"] = len(config["hybrid_override_pattern"])
    # The published 0.02 is about 1/sqrt(2688); the same rule keeps logits from collapsing at small hidden sizes.
    config["initializer_range"] = round(1 / math.sqrt(config["hidden_size"]), 4)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    config["auto_map"] = dict(AUTO_MAP)
    return config


def train_replica_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE with the published special tokens (ids 0-17), eos <|im_end|>, no pad token; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import tokenizer_corpus
    from medlora.modeling.tokenizer import answer_letter_tokens

    rows = generate_splits(seed=0, train_size=TOKENIZER_CORPUS_ROWS, validation_size=0, test_size=0)["train"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tokenizer_corpus(rows), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", model_max_length=262144
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    answer_letter_tokens(tokenizer)  # " A".." D" must be single tokens (evaluation scores them)
    return tokenizer


def hub_tensors(model: Any) -> list[tuple[str, Any]]:
    """The model's tensors under the hub's names and dtypes, in module order.

    The inverse of transformers' `nemotron_h` conversion: `model.` becomes `backbone.`, and each 3-D routed-expert
    parameter `mixer.experts.{up,down}_proj` becomes one `mixer.experts.K.{up,down}_proj.weight` per expert.
    """
    import torch

    tensors: list[tuple[str, Any]] = []
    for name, tensor in model.state_dict().items():
        hub_name = re.sub(r"^model\.", "backbone.", name)
        dtype = torch.float32 if hub_name.endswith(FLOAT32_SUFFIXES) else torch.bfloat16
        expert = re.fullmatch(r"(.*\.mixer\.experts)\.(up_proj|down_proj)", hub_name)
        if expert:
            # clone: safetensors refuses tensors that share storage, as slices of one parameter do
            tensors += [(f"{expert[1]}.{k}.{expert[2]}.weight", t.to(dtype).clone()) for k, t in enumerate(tensor)]
        else:
            tensors.append((hub_name, tensor.to(dtype).contiguous()))
    return tensors


def write_shards(tensors: list[tuple[str, Any]], directory: Path, num_shards: int) -> dict[str, Any]:
    """Write `tensors` in order into `num_shards` safetensors files of about equal bytes; returns the index."""
    from safetensors.torch import save_file

    sizes = [t.numel() * t.element_size() for _, t in tensors]
    total = sum(sizes)
    shards: list[dict[str, Any]] = [{} for _ in range(num_shards)]
    offset = 0
    for (name, tensor), size in zip(tensors, sizes, strict=True):
        shards[min(num_shards - 1, offset * num_shards // total)][name] = tensor
        offset += size
    if not all(shards):
        raise ValueError(f"{num_shards} shards leave one empty: a single tensor holds most of the bytes")
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def randomize_constant_inits(model: Any, generator: Any) -> None:
    """Perturb the tensors NemotronH initialises to constants (norms 1, D 1, A_log log(1..n), router bias 0).

    Otherwise a tensor that loading silently skipped and re-initialised would still equal its file.
    """
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith(("norm.weight", "norm_f.weight", "mixer.D", "mixer.A_log", "e_score_correction_bias")):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_replica(directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a replica of the hub repo at `size` into `directory` (new or empty); returns its path.

    Deterministic: the same size and seed give the same bytes. Raises ValueError for an unknown size and
    FileExistsError for a non-empty directory (stale shards of another size would be left in it).
    """
    # torch and transformers imported here: importing this module stays cheap
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    out = Path(directory)
    config = replica_config(size)  # ValueError for an unknown size, before anything is written
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a replica is written into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_replica_tokenizer(config["vocab_size"])
    tokenizer.save_pretrained(out)
    config = replica_config(size, vocab_size=len(tokenizer))
    write_json(out / "config.json", config)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, im_end], "pad_token_id": 0})
    for filename in REMOTE_CODE_FILES:
        (out / filename).write_text(STUB_SOURCE.format(filename=filename, error=REMOTE_CODE_ERROR), encoding="utf-8")

    fields = {key: value for key, value in config.items() if key not in ("model_type", "auto_map")}
    with torch.random.fork_rng():  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = NemotronHForCausalLM(NemotronHConfig(**fields))
        randomize_constant_inits(model, torch.Generator().manual_seed(seed))
    index = write_shards(hub_tensors(model), out, REPLICA_SHARDS[size])
    write_json(out / "model.safetensors.index.json", index)
    total, shards = index["metadata"]["total_size"], REPLICA_SHARDS[size]
    logger.info(
        "replica of %s (%s): %d parameters, %d bytes in %d shards, vocab %d, at %s",
        HUB_ID, size, model.num_parameters(), total, shards, len(tokenizer), out,
    )  # fmt: skip
    return out
