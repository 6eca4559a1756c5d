"""Stage `evaluate`: lm-evaluation-harness on the validation split for the base, adapter and merged models.

    python pipelines/evaluate.py        # or: dvc repro evaluate

Reads `params.evaluate`, the validated validation split, the base model, the adapter and the merged model; runs
the project's lm-eval tasks (`src/medlora/lm_eval_tasks`) through `lm_eval.simple_evaluate` for each model in
`evaluate.models`; writes per-sample logs to `paths.eval_dir`, `reports/eval.json` (per model and task figures,
per-subject accuracy, the `gate` object promotion reads) and `reports/plots/subject_accuracy.png`, and logs them
to the pipeline's MLflow run (the id in `reports/train.json`).
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.evaluation import harness


def main() -> None:
    run_stage(harness.run)


if __name__ == "__main__":
    main()
