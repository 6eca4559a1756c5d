"""Stage `register`: register this pipeline run's adapter and merged model in the MLflow registry.

    python pipelines/register.py        # or: dvc repro register

Reads reports/train.json (the pipeline's MLflow run), reports/eval.json (`gate`), reports/validation.json and the
outputs/adapter + outputs/merged directories; registers `register.adapter_name` and `register.merged_name`
versions (alias `challenger`, or the existing versions when these outputs were registered before) and writes
reports/registration.json.
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.registry import register


def main() -> None:
    run_stage(register.run)


if __name__ == "__main__":
    main()
