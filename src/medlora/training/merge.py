"""The `merge` stage's verb: fold the adapter into the base (`merge_and_unload`) and prove nothing changed.

The merge runs in the checkpoint's own dtype (bf16 for Nemotron-3-Nano): the merged directory must have exactly the
base checkpoint's tensor names, shapes and dtypes, the layout vLLM and TensorRT-LLM load (modeling/checkpoint.py
restores what `save_pretrained` changes). The merged model is saved, the adapter model is freed, and the copy on
disk is loaded back through `from_pretrained` (the call every consumer uses) and compared with the adapter model
on a fixed batch of formatted examples. Comparing the reloaded copy, not the one in memory, catches a save that
silently loses weights. The tolerance fits the dtype:
- float32: max |logit difference| <= `merge.parity_max_abs_diff` (1e-4; a correct merge is ~1e-6);
- bf16/fp16: mean |difference| of the answer tokens' log-probabilities <= the larger of
  `merge.parity_max_answer_logprob_diff` (nats) and `merge.parity_max_fraction_of_effect` x the adapter's own effect
  on them. W + BA is rounded once more in bf16 (TRL #6688 measured 2e-4 in max logits on the real model); on the
  replica a correct merge is off by ~6% of the adapter's effect, a dropped or doubled adapter by ~100%
  (tests/training/test_merge.py).
On failure nothing is left in `paths.merged_dir` (io.atomic_directory).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

from medlora.core.config import MergeConfig, Params
from medlora.core.contracts import MergeReport, StageFailed, TrainReport
from medlora.core.io import atomic_directory, directory_hash, read_jsonl, write_json
from medlora.modeling.base_model import (
    BASE_REFERENCE_FILE,
    device_map,
    load_base_model,
    pad_token_id,
    read_base_reference,
    weights_location,
)
from medlora.modeling.checkpoint import match_layout, restore_base_tensors

logger = logging.getLogger(__name__)

PARITY_ROWS = 8


class MergeParityError(StageFailed):
    """The reloaded merged model does not reproduce the adapter model within the dtype's tolerance."""


def parity_batch(formatted_file: str | Path, pad_id: int, rows: int = PARITY_ROWS) -> dict[str, Any]:
    """The first `rows` formatted examples as a right-padded batch (input_ids, attention_mask, completion_mask)."""
    import torch

    examples = read_jsonl(formatted_file, ("input_ids",), allow_empty=True)[:rows]
    if not examples:
        raise ValueError(f"{formatted_file}: no rows to compare adapter and merged logits on")
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        ids = example["input_ids"]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = torch.tensor(example.get("completion_mask", [1] * len(ids)))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def batch_logits(model: Any, batch: dict[str, Any]) -> Any:
    """float32 logits of `model` on `batch`, on the CPU."""
    import torch

    device = next(model.parameters()).device
    inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def answer_logprobs(logits: Any, batch: dict[str, Any]) -> Any:
    """Log-probability of each answer token (completion_mask 1) given what precedes it, as a flat tensor."""
    import torch

    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    chosen = logprobs.gather(2, targets[..., None])[..., 0]
    return chosen[batch["completion_mask"][:, 1:].bool()]


def max_abs_diff(a: Any, b: Any, attention_mask: Any) -> float:
    """Largest |a - b| over the real (unpadded) positions."""
    keep = attention_mask.bool()
    return float((a - b).abs()[keep].max())


def parity_verdict(
    dtype: str, adapter_logits: Any, merged_logits: Any, base_logits: Any, batch: dict[str, Any], config: MergeConfig
) -> dict[str, Any]:
    """The comparison of the reloaded merged model with the adapter model, under the tolerance for `dtype`. Pure.

    In half precision the rounding of W + BA grows with the adapter's size, so the threshold is the larger of an
    absolute floor and a fraction of the adapter's own effect (mean |adapter - base| over the answer tokens): a
    merge that drops the adapter or scales it wrongly is off by about the whole effect and fails either way.
    """
    logit_diff = max_abs_diff(adapter_logits, merged_logits, batch["attention_mask"])
    adapter_answers = answer_logprobs(adapter_logits, batch)
    answer_diff = float((adapter_answers - answer_logprobs(merged_logits, batch)).abs().mean())
    effect = float((adapter_answers - answer_logprobs(base_logits, batch)).abs().mean())
    if dtype == "float32":
        metric, value, threshold = "max_abs_logit_diff", logit_diff, config.parity_max_abs_diff
    else:
        metric, value = "mean_abs_answer_logprob_diff", answer_diff
        threshold = max(config.parity_max_answer_logprob_diff, config.parity_max_fraction_of_effect * effect)
    return {
        "max_abs_logit_diff": logit_diff,
        "mean_abs_answer_logprob_diff": answer_diff,
        "adapter_effect_mean_abs_logprob": effect,
        "parity_metric": metric,
        "parity_threshold": threshold,
        "success": value <= threshold,
    }


def free() -> None:
    """Give freed model memory back before the next 60 GB load (CUDA's allocator keeps it cached otherwise)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, parity_file: str | Path, config: MergeConfig
) -> MergeReport:
    """Merge `adapter_dir` into the base, write `merged_dir` in the base checkpoint's layout, return the report.

    Raises MergeParityError (after logging the numbers) when the reloaded merged model does not reproduce the adapter
    model within the dtype's tolerance; `merged_dir` is then left as it was.
    """
    from peft import PeftModel

    reference = read_base_reference(base_dir)
    dtype = reference["torch_dtype"]  # the checkpoint's dtype: the merged weights must keep it
    base, tokenizer = load_base_model(base_dir, torch_dtype=dtype, device_map=device_map())
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    batch = parity_batch(parity_file, pad_token_id(tokenizer))
    adapter_logits = batch_logits(model, batch)
    with model.disable_adapter():
        base_logits = batch_logits(model, batch)  # the adapter's effect, which a broken merge loses
    merged = model.merge_and_unload().eval()
    in_memory = max_abs_diff(adapter_logits, batch_logits(merged, batch), batch["attention_mask"])
    with atomic_directory(merged_dir) as staging:
        restore_base_tensors(merged, *weights_location(base_dir))
        merged.save_pretrained(staging, safe_serialization=True)
        del model, merged, base  # the adapter model is gone before the merged copy is loaded: one model in memory
        free()
        match_layout(staging, *weights_location(base_dir))
        tokenizer.save_pretrained(staging)
        write_json(
            staging / BASE_REFERENCE_FILE,
            {
                **reference,
                "name_or_path": None,  # the merged weights are in this directory, not at the base's location
                "revision": None,
                "weights_sha256": directory_hash(staging),  # the merged weights, not the base's
                "merged": True,
                "merged_from": {"base": reference, "adapter_dir": str(adapter_dir)},
            },
        )
        reloaded, _ = load_base_model(staging, torch_dtype=dtype, device_map=device_map())
        verdict = parity_verdict(
            dtype, adapter_logits, batch_logits(reloaded.eval(), batch), base_logits, batch, config
        )
        del reloaded
        free()
        report = MergeReport(
            max_abs_logit_diff=verdict["max_abs_logit_diff"],
            in_memory_max_abs_logit_diff=in_memory,
            parity_max_abs_diff=config.parity_max_abs_diff,
            parity_rows=int(batch["input_ids"].shape[0]),
            parity_tokens=int(batch["attention_mask"].sum()),
            success=verdict["success"],
            dtype=dtype,
            mean_abs_answer_logprob_diff=verdict["mean_abs_answer_logprob_diff"],
            adapter_effect_mean_abs_logprob=verdict["adapter_effect_mean_abs_logprob"],
            parity_metric=verdict["parity_metric"],
            parity_threshold=verdict["parity_threshold"],
        )
        metric = report.parity_metric
        logger.info(
            "merge parity (%s): %s = %.3g (threshold %.3g)", dtype, metric, verdict[metric], report.parity_threshold
        )
        if not report.success:
            raise MergeParityError(
                f"the reloaded merged model differs from the adapter model: {report.parity_metric} "
                f"{verdict[report.parity_metric]:.3g} > {report.parity_threshold:.3g} ({dtype}) on "
                f"{report.parity_rows} rows of {parity_file}; not writing {merged_dir}",
                report,
            )
    logger.info("merged model written to %s", merged_dir)
    return report


def run(params: Params) -> MergeReport:
    """The merge stage: merge, log the parity figures to the pipeline's MLflow run (from train.json), return them.

    Raises MergeParityError (with the report, which the stage script still writes) when parity fails.
    """
    import mlflow

    from medlora.core import tracking

    reports = params.paths.reports_dir
    run_id = TrainReport.read(reports).require_run_id(reports)
    try:
        report = merge_adapter(
            params.paths.base_model_dir,
            params.paths.adapter_dir,
            params.paths.merged_dir,
            Path(params.paths.formatted_dir) / "early_stop.jsonl",
            params.merge,
        )
    except MergeParityError as error:
        report = dataclasses.replace(error.report, error=str(error))
    with tracking.resume_pipeline_run(params, run_id):
        mlflow.log_metrics({"max_abs_logit_diff": report.max_abs_logit_diff})
        mlflow.log_metrics({"in_memory_max_abs_logit_diff": report.in_memory_max_abs_logit_diff})
        mlflow.log_dict(report.to_dict(), f"merge/{report.FILE}")
    if not report.success:
        raise MergeParityError(report.error, report)
    return report
