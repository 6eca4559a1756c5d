"""A typo in params.yaml stops `dvc repro` at the first stage, with the message and no traceback, and leaves every
other stage's outputs as they were (before: the train stage's own parse failed after DVC had deleted its outputs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import PROJECT_ROOT
from medlora.gpu_check import copy_tracked_files


def test_a_params_typo_stops_dvc_repro_before_any_stage_touches_its_outputs(tmp_path):
    project = copy_tracked_files(PROJECT_ROOT, tmp_path / "medlora", leave_out=("tests/",))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["medlora", "restore"], cwd=project, env=env, check=True, capture_output=True)  # data/ as recorded
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["learning_rat"] = 1e-4  # the typo
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    adapter = project / "outputs" / "adapter" / "adapter_model.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"yesterday's adapter")
    result = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'params'" in output and "Running stage 'validate'" not in output
    assert "params.yaml: train: unknown key 'learning_rat' (known keys:" in output
    assert "Traceback" not in output
    assert adapter.read_bytes() == b"yesterday's adapter"
