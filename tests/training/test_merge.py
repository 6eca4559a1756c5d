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
    report = merge_adapter(tiny_base_dir, adapter_dir, merged_dir, parity_file, threshold=1e-4)
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
    with pytest.raises(MergeParityError, match="differ from the adapter model's") as caught:
        merge_adapter(tiny_base_dir, adapter_dir, tmp_path / "merged", parity_file, threshold=0.0)
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
