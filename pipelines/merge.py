"""Stage `merge`: fold the LoRA adapter into the base model and check the merged model gives the same logits.

    python pipelines/merge.py        # or: dvc repro merge

Reads `params.merge`, the base model, `paths.adapter_dir` and `paths.formatted_dir/early_stop.jsonl` (the fixed
batch the logits are compared on). Writes `paths.merged_dir` (full HF model + tokenizer + medlora_base.json with
`merged: true`) and `reports/merge.json` (`max_abs_logit_diff`, `parity_max_abs_diff`, `success`); logs them to
the pipeline's MLflow run (`mlflow_run_id` in reports/train.json). Fails when the difference exceeds the threshold.
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.training import merge


def main() -> None:
    run_stage(merge.run)


if __name__ == "__main__":
    main()
