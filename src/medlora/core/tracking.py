"""MLflow tracking and registry setup: SQLite store under `mlruns/`, one run per pipeline run.

The train stage opens the pipeline's run and records its id in `reports/train.json` (`mlflow_run_id`); merge,
evaluate and register reopen that run, so one pipeline run is one MLflow run a user can compare in the UI.
`MLFLOW_TRACKING_URI` (for instance a shared `mlflow server`) overrides the local store.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from medlora.core.config import Params

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "medlora"


# `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ (so child processes inherit it). A
# value we put there ourselves is not a user's override: remember it, so a later call for another store (another
# project directory in the same process, as in tests) is not sent to the first one.
_uri_set_by_us: str | None = None


def tracking_uri(mlruns_dir: str | Path) -> str:
    """`sqlite:///<absolute>/mlflow.db`, unless the user's MLFLOW_TRACKING_URI says otherwise.

    Absolute, because `dvc exp run --temp` and queued experiments run in another directory.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env and from_env != _uri_set_by_us:
        return from_env
    return f"sqlite:///{Path(mlruns_dir).resolve() / 'mlflow.db'}"


def artifact_location(mlruns_dir: str | Path) -> str:
    return (Path(mlruns_dir).resolve() / "artifacts").as_uri()


def configure_tracking(params: Params) -> str:
    """Point MLflow (tracking and registry) at the project's store and make sure the experiment exists.

    Returns the experiment id.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    global _uri_set_by_us
    mlruns = Path(params.paths.mlruns_dir)
    uri = tracking_uri(mlruns)
    if uri.startswith("sqlite:"):
        mlruns.mkdir(parents=True, exist_ok=True)
        _uri_set_by_us = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_location(mlruns) if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=location)


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's sha (with `-dirty` when the work tree has changes), or "unknown" outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # dvc.lock is rewritten by the very `dvc repro` that runs us: not a sign of uncommitted code or params.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"],
            cwd=cwd,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def recorded_md5(dvc_file: str | Path) -> str:
    """The md5 a .dvc file records for its output; raises OSError/KeyError/YAMLError when there is none."""
    return str(yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8"))["outs"][0]["md5"])


def data_dvc_md5(path: str | Path = "data.dvc") -> str:
    """The md5 that `data.dvc` records for the snapshot directory, or "unknown"."""
    try:
        return recorded_md5(path)
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


def dvc_lock_md5(stage: str, out_path: str, lock: str | Path = "dvc.lock") -> str:
    """The md5 `dvc.lock` records for one output of one stage, or "unknown" (stage not run through DVC)."""
    try:
        spec = yaml.safe_load(Path(lock).read_text())
        for out in spec["stages"][stage]["outs"]:
            if out["path"] == out_path:
                return str(out["md5"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    return "unknown"


def lineage_tags(params: Params) -> dict[str, str]:
    """Tags every run and registered version carries: where the code, data and configuration came from."""
    return {
        "git_commit": git_commit(),
        "data_dvc_md5": data_dvc_md5(),
        "params_hash": params.params_hash(),
        "model_preset": params.model.preset,
    }


def start_pipeline_run(params: Params, run_name: str | None = None) -> Any:
    """Open a new MLflow run for this pipeline run with every param and the lineage tags."""
    import mlflow

    experiment_id = configure_tracking(params)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=lineage_tags(params))
    flat = {key: str(value)[:6000] for key, value in params.flat().items()}
    mlflow.log_params(flat)
    return run


def resume_pipeline_run(params: Params, run_id: str) -> Any:
    """Reopen the pipeline's run (as recorded by the train stage) from a later stage."""
    import mlflow

    configure_tracking(params)
    return mlflow.start_run(run_id=run_id)
