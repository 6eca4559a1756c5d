"""Stage `train`: LoRA on the base model (backend hf | unsloth | auto), gated, tracked in MLflow, resumable.

    python pipelines/train.py        # or: dvc repro train

Reads `params.lora` (LoraConfig fields + `required_blocks`) and `params.train` (SFTConfig fields + `backend`,
`loss_explosion_factor`), `paths.formatted_dir/{train,early_stop}.jsonl` and the base model. Writes
`paths.adapter_dir` (safetensors adapter + tokenizer + medlora_base.json), checkpoints in
`paths.checkpoints_dir` (a killed run started again resumes from the last one), `reports/train.json`
(`mlflow_run_id`, `trainable_params_by_block`, `coverage`), `reports/train_history.csv` and
`reports/plots/train_loss.png`. Opens the pipeline's MLflow run; later stages reopen it.
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.training import train


def main() -> None:
    run_stage(train.run)


if __name__ == "__main__":
    main()
