"""Recovery after a kill: `dvc repro` SIGKILLed at seeded random moments over different stages, then run again.

What must hold at the end: the pipeline completes and `dvc status` is clean; nothing half-written (`*.partial`
directories, `*.tmp` files) is left where a stage reads; the registry holds no duplicate versions (one per
definition), no orphans (every merged version has its adapter twin and vice versa, every version READY), no run left
RUNNING, and `champion` of the adapter and of the merged model come from one pipeline run.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from tests.conftest import PROJECT_ROOT, stage_env

from medlora.core.contracts import EvalReport, PromotionReport, Registration, TrainReport
from medlora.gpu_check import copy_tracked_files
from stages.test_pipeline import SMALL, run, set_params

pytestmark = pytest.mark.slow

TRIALS = 10
SEED = 20261202
TINY = {
    **SMALL,
    "snapshot": {"train_size": 300, "validation_size": 40, "test_size": 20},
    "train": {"max_steps": 8, "eval_steps": 4, "save_steps": 2, "logging_steps": 2},
    "evaluate": {"limit": 8},
}


# A param whose change makes `dvc repro` run the stage again (and, when its outputs change, what follows it).
KNOBS: dict[str, tuple[str, str]] = {
    "validate": ("validate", "question_max_chars"),
    "model": ("model", "seed"),
    "format": ("format", "early_stopping_size"),
    "train": ("train", "max_steps"),
    "merge": ("merge", "parity_max_abs_diff"),
    "evaluate": ("evaluate", "limit"),
    "register": ("promote", "max_p_value"),  # register reads the promote gates (register_merged: if_promotable)
    "promote": ("promote", "min_uplift"),
}
SCHEDULE = ["validate", "model", "format", "train", "train", "merge", "evaluate", "register", "promote", "register"]


def nudge(project: Path, stage: str, trial: int) -> None:
    """Change the knob of `stage` to a value it has not had, so the next repro runs that stage."""
    section, key = KNOBS[stage]
    params = yaml.safe_load((project / "params.yaml").read_text())
    value = params[section][key]
    params[section][key] = value + 1 if isinstance(value, int) else value * 1.5 + 1e-9 * trial
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro_killed_in(project: Path, env: dict[str, str], stage: str, seconds: float) -> list[str]:
    """`make run`'s two steps: `medlora restore` (which also repairs what a killed DVC left, see
    data/snapshot.repair_dvc_state), then `dvc repro`; `seconds` after `stage` starts, SIGKILL the whole process
    group (DVC and the stage's python, as closing the terminal does). Returns the stages that started; the last one
    is where the kill landed."""
    run(["medlora", "restore"], project, env)
    process = subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    started, lines = [], []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"Running stage '(\w+)'", line)
        if found:
            started.append(found.group(1))
            if found.group(1) == stage:
                time.sleep(seconds)
                break
    with contextlib.suppress(ProcessLookupError):  # DVC may have stopped on its own
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if not started or started[-1] != stage:
        raise AssertionError(f"{stage} did not run ({started}); dvc repro said:\n{''.join(lines)[-3000:]}")
    return started


def test_seeded_kills_over_every_stage_leave_a_consistent_pipeline_and_registry(tmp_path):
    import mlflow

    project = copy_tracked_files(PROJECT_ROOT, tmp_path / "medlora")
    env = stage_env()
    set_params(project, TINY)
    for command in (["git", "init", "-q"], ["medlora", "snapshot", "--source", "synthetic"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "kill test"]):  # fmt: skip
        run(command, project, env)

    rng = random.Random(SEED)
    run(["dvc", "repro"], project, env)  # a champion first: later candidates are judged against it
    started = time.monotonic()
    killed_in = []
    for trial, stage in enumerate(rng.sample(SCHEDULE, len(SCHEDULE))):
        nudge(project, stage, trial)
        repro_killed_in(project, env, stage, rng.uniform(0.2, 6.0))
        killed_in.append(stage)
    run(["medlora", "restore"], project, env)  # the rerun after the last kill, as `make run` does it, completes
    run(["dvc", "repro"], project, env)
    assert "up to date" in run(["dvc", "status"], project, env).lower()
    print(f"kills landed in {killed_in}; {time.monotonic() - started:.0f} s for the trials and the rerun")

    leftovers = [p for p in (project / "outputs").rglob("*") if p.name.endswith((".partial", ".old", ".tmp"))]
    leftovers += [p for p in (project / "reports").rglob("*.tmp*")]
    assert not leftovers, leftovers
    reports = project / "reports"
    train, evaluation = TrainReport.read(reports), EvalReport.read(reports)
    registration, promotion = Registration.read(reports), PromotionReport.read(reports)
    assert registration.mlflow_run_id == train.mlflow_run_id and evaluation.gate.metric

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    adapters = client.search_model_versions("name='medlora-adapter'")
    merged = client.search_model_versions("name='medlora-merged'")
    assert all(version.status == "READY" for version in adapters + merged)
    definitions = [(v.tags.get("params_hash"), v.tags.get("inputs_hash"), v.tags.get("data_dvc_md5")) for v in adapters]
    assert len(definitions) == len(set(definitions)), "the same definition was registered twice"
    by_adapter = {str(v.version): v for v in adapters}
    for version in merged:  # no orphans: twins point at each other
        twin = by_adapter[version.tags["adapter_version"]]
        assert twin.tags["merged_version"] == str(version.version) and twin.run_id == version.run_id
    champion_adapter = client.get_model_version_by_alias("medlora-adapter", "champion")
    champion_merged = client.get_model_version_by_alias("medlora-merged", "champion")
    assert champion_adapter.run_id == champion_merged.run_id
    assert str(champion_merged.version) == champion_adapter.tags["merged_version"]
    experiment = client.get_experiment_by_name("medlora")
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert not running, [run.info.run_id for run in running]
    assert promotion.decision in ("promoted", "rejected")
