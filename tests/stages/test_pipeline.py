"""The whole lifecycle on the embedded default, as a newcomer runs it: a fresh git+DVC project, `dvc repro`,
then a worse params change that must register a challenger the gates reject.

Real DVC, peft/trl, lm-eval and MLflow registry; only the sizes are smaller than `make run`'s.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.conftest import PROJECT_ROOT, stage_env

from medlora.core.io import sha256_file
from medlora.gpu_check import copy_tracked_files

pytestmark = pytest.mark.slow

SMALL = {
    "snapshot": {"train_size": 600, "validation_size": 120, "test_size": 40},
    "format": {"early_stopping_size": 40},
    "train": {"max_steps": 30, "eval_steps": 15, "save_steps": 15, "logging_steps": 5},
}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def set_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the tracked project files in a new git repo (what a clone has), with small params."""
    project = copy_tracked_files(PROJECT_ROOT, tmp_path_factory.mktemp("e2e") / "medlora")
    env = stage_env()
    set_params(project, SMALL)
    run(["git", "init", "-q"], project, env)
    run(["medlora", "snapshot", "--source", "synthetic"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "small snapshot"], project, env)
    run(["dvc", "repro"], project, env)
    return project, env


def registry(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_first_run_promotes_adapter_and_merged_champions_from_one_run(project):
    root, env = project
    assert "up to date" in run(["dvc", "status"], root, env).lower()
    validation = json.loads((root / "reports" / "validation.json").read_text())
    assert validation["success"]
    for counts in validation["splits"].values():
        assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]
    gate = json.loads((root / "reports" / "eval.json").read_text())["gate"]
    assert gate["uplift"] > 0 and gate["p_value"] < 0.01
    assert gate["merged_vs_adapter"] < 0.01 * abs(gate["adapter"])
    promotion = json.loads((root / "reports" / "promotion.json").read_text())
    assert promotion["decision"] == "promoted", promotion["reasons"]
    client = registry(root)
    adapter = client.get_model_version_by_alias("medlora-adapter", "champion")
    merged = client.get_model_version_by_alias("medlora-merged", "champion")
    train_run = json.loads((root / "reports" / "train.json").read_text())["mlflow_run_id"]
    assert adapter.run_id == merged.run_id == train_run
    for png in ("train_loss.png", "subject_accuracy.png"):
        assert (root / "reports" / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # The merged weights exist in outputs/ and once more in MLflow's artifact store (the registered version), never
    # a third time in the DVC cache: 2 bytes written per weight byte (3 before dvc.yaml's `cache: false`).
    merged = {sha256_file(p): p.stat().st_size for p in (root / "outputs" / "merged").glob("*.safetensors")}
    elsewhere = [
        path
        for folder in (root / ".dvc" / "cache", root / "mlruns")
        for path in folder.rglob("*")
        if path.is_file() and path.stat().st_size in merged.values() and sha256_file(path) in merged
    ]
    assert len(elsewhere) == len(merged) and all("mlruns" in path.parts for path in elsewhere), elsewhere
    metrics = run(["dvc", "metrics", "show", "--json"], root, env)
    assert "uplift" in metrics and "rows_kept" in metrics


def test_worse_params_register_a_challenger_that_stays_challenger(project):
    root, env = project
    set_params(root, {"train": {"max_steps": 1}})
    run(["dvc", "repro"], root, env)
    promotion = json.loads((root / "reports" / "promotion.json").read_text())
    assert promotion["decision"] == "rejected"
    failed = [reason for reason in promotion["reasons"] if reason.startswith("FAIL")]
    assert any("champion" in reason for reason in failed), promotion["reasons"]
    client = registry(root)
    champion = client.get_model_version_by_alias("medlora-adapter", "champion")
    challenger = client.get_model_version_by_alias("medlora-adapter", "challenger")
    assert int(challenger.version) == int(champion.version) + 1
    assert promotion["champion_after"] == promotion["champion_before"]
    # A no-op repro afterwards does nothing (and stays cheap).
    assert "Running stage" not in run(["dvc", "repro"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env).lower()
