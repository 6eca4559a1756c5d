"""The `merge` stage's verb: fold the adapter into the base (`merge_and_unload`) and prove nothing changed.

The merged model is saved, loaded back through `from_pretrained` (the call every consumer uses) and compared with
the adapter model on a fixed batch of formatted examples: the max absolute logit difference must stay under
`merge.parity_max_abs_diff`. Comparing the reloaded copy, not the one in memory, is what catches a save that
silently loses weights. On failure nothing is left in `paths.merged_dir` (io.atomic_directory).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import MergeReport, StageFailed, TrainReport
from medlora.core.io import atomic_directory, directory_hash, read_jsonl, write_json
from medlora.modeling.base_model import BASE_REFERENCE_FILE, load_base_model, read_base_reference

logger = logging.getLogger(__name__)

PARITY_ROWS = 8


class MergeParityError(StageFailed):
    """The merged model's logits differ from the adapter model's by more than merge.parity_max_abs_diff."""


def parity_batch(formatted_file: str | Path, pad_token_id: int, rows: int = PARITY_ROWS) -> dict[str, Any]:
    """The first `rows` formatted examples as a right-padded batch (input_ids, attention_mask)."""
    import torch

    sequences = [row["input_ids"] for row in read_jsonl(formatted_file, ("input_ids",), allow_empty=True)[:rows]]
    if not sequences:
        raise ValueError(f"{formatted_file}: no rows to compare adapter and merged logits on")
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_logits(model: Any, batch: dict[str, Any]) -> Any:
    """float32 logits of `model` on `batch`, on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    return out.logits.float().cpu()


def max_abs_diff(a: Any, b: Any, attention_mask: Any) -> float:
    """Largest |a - b| over the real (unpadded) positions."""
    keep = attention_mask.bool()
    return float((a - b).abs()[keep].max())


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, parity_file: str | Path, threshold: float
) -> MergeReport:
    """Merge `adapter_dir` into the base, write `merged_dir`, return the parity report.

    Raises MergeParityError (after logging the numbers) when the reloaded merged model's logits differ from the
    adapter model's by more than `threshold`; `merged_dir` is then left as it was.
    """
    import torch
    from peft import PeftModel

    dtype = None if torch.cuda.is_available() else "float32"
    base, tokenizer = load_base_model(base_dir, torch_dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    batch = parity_batch(parity_file, tokenizer.pad_token_id)
    adapter_logits = batch_logits(model, batch)
    merged = model.merge_and_unload().eval()
    in_memory = max_abs_diff(adapter_logits, batch_logits(merged, batch), batch["attention_mask"])
    with atomic_directory(merged_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        reference = read_base_reference(base_dir)
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
        del merged
        reloaded, _ = load_base_model(staging, torch_dtype=dtype)
        diff = max_abs_diff(adapter_logits, batch_logits(reloaded.eval(), batch), batch["attention_mask"])
        report = MergeReport(
            max_abs_logit_diff=diff,
            in_memory_max_abs_logit_diff=in_memory,
            parity_max_abs_diff=threshold,
            parity_rows=int(batch["input_ids"].shape[0]),
            parity_tokens=int(batch["attention_mask"].sum()),
            success=diff <= threshold,
        )
        logger.info("merge parity: max |adapter - merged| logit = %.3g (threshold %.3g)", diff, threshold)
        if not report.success:
            raise MergeParityError(
                f"merged model's logits differ from the adapter model's by {diff:.3g} > merge.parity_max_abs_diff "
                f"{threshold:.3g} on {report.parity_rows} rows of {parity_file}; not writing {merged_dir}",
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
            params.merge.parity_max_abs_diff,
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
