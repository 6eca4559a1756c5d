"""Stage `evaluate`: lm-evaluation-harness on the validation split for the base, adapter and merged models.

    python pipelines/evaluate.py        # or: dvc repro evaluate

Reads `params.evaluate`, the validated validation split, the base model, the adapter and the merged model; runs
the project's lm-eval tasks (`src/medlora/lm_eval_tasks`) through `lm_eval.simple_evaluate` for each model in
`evaluate.models`; writes per-sample logs to `paths.eval_dir`, `reports/eval.json` (per model and task figures,
per-subject accuracy, the `gate` object promotion reads) and `reports/plots/subject_accuracy.png`, and logs them
to the pipeline's MLflow run (the id in `reports/train.json`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from medlora.core.config import load_params
from medlora.evaluation.harness import evaluate
from medlora.evaluation.report import log_to_mlflow
from medlora.core.logs import setup_logging

logger = logging.getLogger("pipelines.evaluate")


def main() -> None:
    setup_logging()
    params = load_params()
    report = evaluate(params)
    reports = Path(params.paths.reports_dir)
    log_to_mlflow(params, report, [reports / "eval.json", reports / "plots" / "subject_accuracy.png"])
    gate = report["gate"]
    logger.info(
        "evaluate: %s base %s adapter %s merged %s uplift %s p %s (%.1f s)",
        gate["metric"],
        gate["base"],
        gate["adapter"],
        gate["merged"],
        gate["uplift"],
        gate["p_value"],
        report["wall_seconds"],
    )


if __name__ == "__main__":
    main()
