"""`dvc exp`: a queued sweep in a fresh git+DVC project, as a user runs one.

    dvc repro                                   # the champion
    dvc exp run --queue -S train.max_steps=2    # two worse candidates, queued
    dvc exp run --queue -S train.max_steps=3
    dvc exp run --run-all                       # each runs in a temp copy under .dvc/tmp/exps/
    dvc exp show

Queued (and `--temp`) experiments run their stages in a throwaway copy of the project; they must still log, register
and meet the gates in the project's one MLflow store, and their metrics must still be listed by `dvc exp show`.
Real DVC, peft/trl, lm-eval and MLflow at the smallest sizes that still pass the gates (about 3 minutes).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.conftest import PROJECT_ROOT, stage_env

from medlora.gpu_check import copy_tracked_files

pytestmark = pytest.mark.slow

TINY = {
    "snapshot": {"train_size": 300, "validation_size": 40, "test_size": 20},
    "format": {"early_stopping_size": 20},
    "train": {"max_steps": 10, "eval_steps": 5, "save_steps": 5, "logging_steps": 5},
    "evaluate": {"limit": 20},
}
SWEEP = (2, 3)  # train.max_steps of the queued candidates: both worse than the champion's 10


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def copy_project(target: Path) -> None:
    """The project's files as a clone has them, without tests, data or lock."""
    copy_tracked_files(PROJECT_ROOT, target)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("exp") / "medlora"
    copy_project(root)
    env = stage_env(PYTHONPATH=str(root / "src"))  # the stages run this project's code, as in a clone
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root, env)
    run(["medlora", "snapshot", "--source", "synthetic"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny snapshot"], root, env)
    run(["dvc", "repro"], root, env)
    run(["git", "add", "dvc.lock"], root, env)
    run(["git", "commit", "-qm", "champion"], root, env)  # the baseline the experiments start from
    names = {}
    try:
        for steps in SWEEP:
            queued = run(["dvc", "exp", "run", "--queue", "-S", f"train.max_steps={steps}"], root, env)
            names[steps] = re.search(r"Queued experiment '([^']+)'", queued).group(1)
        log = run(["dvc", "exp", "run", "--run-all"], root, env, timeout=1200)
        assert "Failed to reproduce" not in log, log[-4000:]
        shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    finally:  # never leave a queue worker running experiments after a failure
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, env=env, capture_output=True, timeout=120)
    return {"root": root, "env": env, "names": names, "shown": shown}


def store(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_queued_experiments_log_register_and_meet_the_gates_in_the_projects_store(sweep):
    root, names = sweep["root"], sweep["names"]
    client = store(root)
    runs = client.search_runs([client.get_experiment_by_name("medlora").experiment_id])
    by_steps = {int(run.data.params["train.max_steps"]): run for run in runs}
    assert sorted(by_steps) == [*SWEEP, 10], [r.info.run_name for r in runs]
    artifacts = (root / "mlruns" / "artifacts").as_uri()
    assert all(run.info.artifact_uri.startswith(artifacts) for run in runs)
    for steps, name in names.items():  # named as `dvc exp show` names them
        assert by_steps[steps].info.run_name == name
        assert by_steps[steps].data.tags["dvc_exp_name"] == name
    assert by_steps[10].info.run_name != "train"

    for model in ("medlora-adapter", "medlora-merged"):
        versions = {int(v.version): v for v in client.search_model_versions(f"name='{model}'")}
        assert sorted(versions) == [1, 2, 3], f"{model}: the queued runs registered elsewhere"
        assert {versions[v].run_id for v in (2, 3)} == {by_steps[s].info.run_id for s in SWEEP}
        # The gates ran against the project's champion (a 10-step model): both candidates are worse, so it stays.
        assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
        assert str(client.get_model_version_by_alias(model, "challenger").version) == "3"
    champion = float(client.get_model_version("medlora-adapter", "1").tags["gate.adapter"])
    for version in ("2", "3"):
        assert float(client.get_model_version("medlora-adapter", version).tags["gate.adapter"]) < champion
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db")), "a store was created inside DVC's temp copies"


def flat_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_exp_show_lists_each_experiments_key_metrics_and_no_per_subject_figures(sweep):
    shown, names = sweep["shown"], sweep["names"]
    experiments = {
        rev["name"]: rev["data"]
        for baseline in shown
        for group in baseline.get("experiments") or []
        for rev in group["revs"]
    }
    assert set(names.values()) <= set(experiments), experiments.keys()
    rows = {"workspace": shown[0]["data"], **{name: experiments[name] for name in names.values()}}
    for name, data in rows.items():
        metrics = data["metrics"]
        errors = {path: found["error"] for path, found in metrics.items() if "error" in found}
        assert not errors, f"{name}: {errors}"
        values = {f"{Path(path).stem}:{key}": value for path, found in metrics.items()
                  for key, value in flat_keys(found["data"]).items()}  # fmt: skip
        for key in ("evaluate:gate.uplift", "train:eval_loss_final", "validate:rows_kept", "promote:champion_version"):
            assert isinstance(values.get(key), int | float), f"{name}: {key} missing in {sorted(values)}"
        assert not [key for key in values if "subject" in key or "choice_type" in key], f"{name}: {sorted(values)}"
        assert len(values) <= 60, f"{name}: {len(values)} columns"
    for steps, name in names.items():
        values = {
            key: value for found in rows[name]["metrics"].values() for key, value in flat_keys(found["data"]).items()
        }
        assert values["global_step"] == steps
        # Each candidate met the gates against the project's champion (version 1) and was rejected.
        assert values["champion_version"] == 1 and values["promoted"] is False
        assert values["candidate_version"] in (2, 3)
