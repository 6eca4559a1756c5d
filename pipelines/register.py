"""Stage `register`: register this pipeline run's adapter and merged model in the MLflow registry.

    python pipelines/register.py        # or: dvc repro register

Reads reports/train.json (the pipeline's MLflow run), reports/eval.json (`gate`), reports/validation.json and the
outputs/adapter + outputs/merged directories; registers `register.adapter_name` and `register.merged_name`
versions (alias `challenger`, or the existing versions when these outputs were registered before) and writes
reports/registration.json.
"""

from __future__ import annotations

from pathlib import Path

from medlora.core.config import load_params
from medlora.core.io import write_json
from medlora.core.logs import setup_logging
from medlora.registry.register import register


def main() -> None:
    setup_logging()
    params = load_params()
    registration = register(params)
    write_json(Path(params.paths.reports_dir) / "registration.json", registration)


if __name__ == "__main__":
    main()
