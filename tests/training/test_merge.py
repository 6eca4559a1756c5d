"""The merge stage: merged model == adapter model (logits), through a real save and from_pretrained reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import example_rows, write_train_report
from medlora.core.config import MergeConfig, Params, PathsConfig
from medlora.core.contracts import MergeReport
from medlora.modeling.presets import NEMOTRON_H_TARGETS
from medlora.training.merge import MergeParityError, batch_logits, merge_adapter, parity_batch
from medlora.training.merge import run as merge


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dir, tmp_path_factory) -> Path:
    """A saved LoRA adapter with random (nonzero) A and B: merging it really changes the weights."""
    from peft import LoraConfig, get_peft_model

    from medlora.modeling.base_model import load_base_model

    model, tokenizer = load_base_model(tiny_base_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(NEMOTRON_H_TARGETS), init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def parity_file(tiny_base_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from medlora.modeling.prompts import training_messages

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    path = tmp_path_factory.mktemp("formatted") / "early_stop.jsonl"
    lines = []
    for row in example_rows(10):
        ids = tokenizer.apply_chat_template(training_messages(row), tokenize=True, return_dict=True)["input_ids"]
        lines.append(json.dumps({"id": row["id"], "input_ids": list(ids), "completion_mask": [1] * len(ids)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_merged_model_reloads_with_the_adapter_models_logits(tmp_path, tiny_base_dir, adapter_dir, parity_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medlora.modeling.base_model import load_base_model, read_base_reference

    merged_dir = tmp_path / "merged"
    report = merge_adapter(tiny_base_dir, adapter_dir, merged_dir, parity_file, MergeConfig(parity_max_abs_diff=1e-4))
    assert report.success and report.max_abs_logit_diff < 1e-4 and report.parity_rows == 8

    # Independently: a fresh process-style reload of the merged dir against base + adapter.
    base, tokenizer = load_base_model(tiny_base_dir)
    batch = parity_batch(parity_file, tokenizer.pad_token_id)
    base_logits = batch_logits(base.eval(), batch)
    adapter_logits = batch_logits(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), batch)
    merged_logits = batch_logits(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), batch)
    keep = batch["attention_mask"].bool()
    assert (merged_logits - adapter_logits).abs()[keep].max() < 1e-4
    assert (merged_logits - base_logits).abs()[keep].max() > 1e-2  # the adapter really is in the weights
    reference = read_base_reference(merged_dir)
    assert reference["merged"] is True and reference["name_or_path"] is None
    assert reference["weights_sha256"] != read_base_reference(tiny_base_dir)["weights_sha256"]
    assert (merged_dir / "tokenizer.json").exists() and not list(merged_dir.glob("adapter_*"))


def test_parity_failure_leaves_no_merged_output(tmp_path, tiny_base_dir, adapter_dir, parity_file):
    with pytest.raises(MergeParityError, match="differs from the adapter model: max_abs_logit_diff") as caught:
        merge_adapter(
            tiny_base_dir, adapter_dir, tmp_path / "merged", parity_file, MergeConfig(parity_max_abs_diff=0.0)
        )
    assert caught.value.report.success is False and caught.value.report.max_abs_logit_diff > 0
    assert not (tmp_path / "merged").exists()


def test_merge_stage_writes_report_and_logs_to_the_pipeline_run(tmp_path, tiny_base_dir, adapter_dir, parity_file):
    import mlflow

    from medlora.core import tracking

    paths = PathsConfig(
        reports_dir=str(tmp_path / "reports"),
        base_model_dir=str(tiny_base_dir),
        formatted_dir=str(parity_file.parent),
        adapter_dir=str(adapter_dir),
        merged_dir=str(tmp_path / "merged"),
        mlruns_dir=str(tmp_path / "mlruns"),
    )
    params = Params(paths=paths, merge=MergeConfig(parity_max_abs_diff=1e-4))
    with tracking.start_pipeline_run(params, "train") as run:  # what the train stage leaves behind
        run_id = run.info.run_id
    write_train_report(tmp_path / "reports", run_id)

    report = merge(params)
    report.write(tmp_path / "reports")
    saved = json.loads((tmp_path / "reports" / "merge.json").read_text())
    assert "error" not in saved and MergeReport.read(tmp_path / "reports") == report
    assert report.success and saved["parity_max_abs_diff"] == 1e-4
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path / "mlruns"))
    logged = client.get_run(run_id).data.metrics["max_abs_logit_diff"]
    assert logged == pytest.approx(report.max_abs_logit_diff)


@pytest.fixture(scope="module")
def replica_adapter(replica_base_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(adapter dir, parity file) on the bf16 replica: a LoRA adapter large enough that losing it shows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from medlora.core.config import FormatConfig
    from medlora.core.io import write_jsonl
    from medlora.modeling.base_model import load_base_model
    from medlora.modeling.formatting import render_example

    model, tokenizer = load_base_model(replica_base_dir)
    assert tokenizer.pad_token is None and next(model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=list(NEMOTRON_H_TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.3)
    out = tmp_path_factory.mktemp("replica_adapter")
    peft_model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    chat = AutoTokenizer.from_pretrained(replica_base_dir)
    write_jsonl(out / "early_stop.jsonl", [render_example(row, chat, FormatConfig()) for row in example_rows(8)])
    return out / "adapter", out / "early_stop.jsonl"


def test_bf16_merge_keeps_the_checkpoint_layout_and_passes_parity(
    replica_dir, replica_base_dir, replica_adapter, tmp_path
):
    from transformers import AutoModelForCausalLM

    from medlora.modeling.checkpoint import checkpoint_files, layout_difference, read_layout

    adapter, parity = replica_adapter
    report = merge_adapter(replica_base_dir, adapter, tmp_path / "merged", parity, MergeConfig())
    assert report.success and report.dtype == "bfloat16" and report.parity_metric == "mean_abs_answer_logprob_diff"
    assert report.mean_abs_answer_logprob_diff < MergeConfig().parity_max_answer_logprob_diff
    # The layout vLLM and TensorRT-LLM load: every name, shape and dtype of the hub checkpoint (F32 A_log/D kept).
    expected = read_layout(checkpoint_files(replica_dir))
    assert layout_difference(expected, read_layout(checkpoint_files(tmp_path / "merged"))) == []
    assert {dtype for dtype, _ in expected.values()} == {"BF16", "F32"}
    assert (tmp_path / "merged" / "config.json").read_bytes() == (replica_dir / "config.json").read_bytes()
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("broken", ["adapter dropped", "scale doubled"])
def test_broken_bf16_merges_fail_parity(replica_base_dir, replica_adapter, tmp_path, monkeypatch, broken):
    from peft.tuners.tuners_utils import BaseTuner  # what PeftModel.merge_and_unload delegates to

    adapter, parity = replica_adapter
    original = BaseTuner.merge_and_unload

    def broken_merge(self, *args, **kwargs):
        if broken == "adapter dropped":
            return self.unload()
        for module in self.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {key: 2 * value for key, value in module.scaling.items()}
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken_merge)
    with pytest.raises(MergeParityError, match="mean_abs_answer_logprob_diff") as caught:
        merge_adapter(replica_base_dir, adapter, tmp_path / "merged", parity, MergeConfig())
    assert caught.value.report.mean_abs_answer_logprob_diff > 4 * MergeConfig().parity_max_answer_logprob_diff
    assert not (tmp_path / "merged").exists()


def test_the_adapter_model_is_freed_before_the_merged_copy_loads(
    tmp_path, tiny_base_dir, adapter_dir, parity_file, monkeypatch
):
    """One model in memory at a time: with 60 GB of weights, a second live copy is what runs a host out of memory."""
    import gc
    import weakref

    from peft import PeftModel

    from medlora.training import merge as merge_module

    alive: list[weakref.ref] = []
    original_from_pretrained, original_load = PeftModel.from_pretrained, merge_module.load_base_model

    def tracked_from_pretrained(*args, **kwargs):
        model = original_from_pretrained(*args, **kwargs)
        alive.append(weakref.ref(model))
        alive.append(weakref.ref(model.get_base_model()))
        return model

    calls = []

    def tracked_load(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # the reload of the merged directory
            gc.collect()
            assert alive and all(ref() is None for ref in alive), "the adapter model is still in memory"
        return original_load(*args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", tracked_from_pretrained)
    monkeypatch.setattr(merge_module, "load_base_model", tracked_load)
    merge_adapter(tiny_base_dir, adapter_dir, tmp_path / "merged", parity_file, MergeConfig())
    assert len(calls) == 2
