"""The MLflow store a stage writes to: one per project wherever DVC runs the stage, relocatable, runs with names.

The DVC side of the first point (a real queued sweep) is tests/stages/test_experiments.py; these are the fast checks.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest
from tests.conftest import PROJECT_ROOT

from medlora.core import tracking
from medlora.core.config import Params, PathsConfig, TrainConfig


@pytest.fixture
def clean_dvc_env(monkeypatch):
    for variable in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_a_temp_or_queued_experiment_uses_the_projects_store(tmp_path, clean_dvc_env):
    """DVC runs `--temp` and queued experiments in <root>/.dvc/tmp/exps/<name>/ and sets DVC_ROOT to <root>."""
    executor = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    executor.mkdir(parents=True)
    clean_dvc_env.chdir(executor)
    clean_dvc_env.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert tracking.tracking_uri("mlruns") == f"sqlite:///{(tmp_path / 'project' / 'mlruns' / 'mlflow.db').resolve()}"
    assert tracking.artifact_location("mlruns") == (tmp_path / "project" / "mlruns" / "artifacts").resolve().as_uri()


def test_without_dvc_root_the_executor_layout_still_leads_to_the_project(tmp_path, clean_dvc_env):
    executor = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "celery" / "abc123"
    executor.mkdir(parents=True)
    clean_dvc_env.chdir(executor)
    assert tracking.project_root() == (tmp_path / "project").resolve()


def test_the_workspace_and_absolute_paths_are_unchanged(tmp_path, clean_dvc_env):
    clean_dvc_env.chdir(tmp_path)
    assert tracking.store_dir("mlruns") == (tmp_path / "mlruns").resolve()
    clean_dvc_env.setenv("DVC_ROOT", str(tmp_path))  # `dvc repro` and workspace `dvc exp run`
    assert tracking.store_dir("mlruns") == (tmp_path / "mlruns").resolve()
    assert tracking.store_dir(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()
    clean_dvc_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")  # the user's server wins
    assert tracking.tracking_uri("mlruns") == "http://mlflow.internal:5000"


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def log_and_register(params: Params, name: str) -> str:
    """A tracking operation that writes everywhere the store writes: a run, an artifact, a registered version."""
    with tracking.start_pipeline_run(params) as run:
        mlflow.log_text("hello", "notes/hello.txt")
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        version = mlflow.register_model(info.model_uri, name)
    assert run.info.artifact_uri.startswith(tracking.artifact_location(params.paths.mlruns_dir))
    return str(version.version)


def tree_state(root: Path) -> dict[str, str]:
    """Every file under `root` with its content hash."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_a_copied_or_moved_project_writes_only_inside_itself(tmp_path, clean_dvc_env):
    old, new = tmp_path / "old" / "medlora", tmp_path / "new" / "medlora"
    old.mkdir(parents=True)
    clean_dvc_env.chdir(old)
    params = Params(paths=PathsConfig(mlruns_dir="mlruns"))
    assert log_and_register(params, "relocatable") == "1"
    shutil.copytree(old, new)
    before = tree_state(old)

    clean_dvc_env.chdir(new)
    assert log_and_register(params, "relocatable") == "2"
    mlflow.pyfunc.load_model("models:/relocatable/2")

    assert tree_state(old) == before, "the copy wrote into the folder it was copied from"
    with sqlite3.connect(new / "mlruns" / "mlflow.db") as db:
        dump = "\n".join(db.iterdump())
    assert str(old) not in dump, "the copy's store still records paths in the old folder"
    shutil.rmtree(old)  # the move: the old folder is gone, and both versions load from the new place
    for version in ("1", "2"):
        model = mlflow.pyfunc.load_model(f"models:/relocatable/{version}")
        assert list(model.predict(["x"])) == ["x"]
    assert tracking.relocate_store("mlruns") is False  # once relocated, nothing more to do


def test_runs_are_named_after_the_dvc_experiment_or_what_changed(tmp_path, clean_dvc_env):
    from medlora.training.train import open_run

    clean_dvc_env.chdir(tmp_path)
    changed = Params(train=TrainConfig(max_steps=1, learning_rate=1e-3))
    assert tracking.run_name(changed) == "learning_rate=0.001 max_steps=1"
    assert re.fullmatch(r"run-\d{8}-\d{6}", tracking.run_name(Params()))
    many = Params(train=TrainConfig(**{key: 7 for key in ("max_steps", "warmup_steps", "eval_steps", "save_steps",
                                                         "logging_steps", "save_total_limit")}))  # fmt: skip
    assert len(tracking.run_name(many)) <= 64 and tracking.run_name(many).endswith(("+2", "+3", "+4"))

    clean_dvc_env.setenv("DVC_EXP_NAME", "tipsy-moth")
    clean_dvc_env.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    with open_run(changed, run_id="") as run:
        pass
    recorded = mlflow.get_run(run.info.run_id)
    assert recorded.info.run_name == "tipsy-moth"
    assert recorded.data.tags["dvc_exp_name"] == "tipsy-moth"
    assert recorded.data.tags["params_changed"] == "train.learning_rate=0.001 train.max_steps=1"


def test_make_ui_starts_no_idle_job_workers():
    """`mlflow ui` starts 7 job-runner processes unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION is false."""
    recipe = subprocess.run(
        ["make", "-n", "-s", "ui"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout
    command = next(line for line in recipe.splitlines() if "mlflow ui" in line or "mlflow server" in line)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in command
