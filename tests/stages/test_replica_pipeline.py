"""The production path on CPU: `dvc repro` with the production params file on an offline replica of the hub
checkpoint (sharded bf16 safetensors under the hub's names, remote-code files that must never run, a tokenizer
with no pad token and the thinking chat template). Only model.name_or_path, the data source and sizes, and the step
counts differ from configs/nemotron-3-nano-30b-a3b.yaml: a break here is a production defect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT
from medlora.core.io import sha256_file

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def replica_project(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The scratch project scripts/gpu_check.sh builds, run here on the CPU."""
    from medlora.gpu_check import dvc_env, replica_project

    project, replica = replica_project(PROJECT_ROOT, tmp_path_factory.mktemp("replica_e2e"), "tiny")
    env = {**dvc_env(), "OMP_NUM_THREADS": "1"}
    run(["git", "init", "-q"], project, env)
    run(["medlora", "snapshot", "--source", "synthetic"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "replica project"], project, env)
    run(["dvc", "repro"], project, env)
    return project, replica, env


def test_gpu_check_refuses_without_cuda_and_its_dry_run_changes_only_what_it_says(tmp_path):
    """scripts/gpu_check.sh up to the CUDA boundary."""
    from medlora.gpu_check import CHANGES

    script = PROJECT_ROOT / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run(
        ["bash", script, "--keep", str(tmp_path / "none")], env=env, capture_output=True, text=True
    )
    verdict = json.loads(refused.stdout.strip().splitlines()[-1])
    assert refused.returncode == 3 and verdict["held"] is False and verdict["environment"]["cuda"] is False
    assert not (tmp_path / "none" / "medlora").exists()  # nothing was built or run
    dry = subprocess.run(["bash", script, "--dry-run", "--size", "tiny", "--keep", str(tmp_path / "dry")], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]
    built = yaml.safe_load((tmp_path / "dry" / "medlora" / "params.yaml").read_text())
    production = yaml.safe_load((PROJECT_ROOT / "configs" / "nemotron-3-nano-30b-a3b.yaml").read_text())
    changed = {f"{s}.{k}" for s in production for k in production[s] if built[s][k] != production[s][k]}
    assert changed == {"model.name_or_path"} | {f"{s}.{k}" for s, values in CHANGES.items() for k in values}
    assert (tmp_path / "dry" / "replica" / "model.safetensors.index.json").is_file()


def report(project: Path, name: str) -> dict:
    return json.loads((project / "reports" / name).read_text())


def test_production_params_run_every_stage_on_the_replica(replica_project):
    project, replica, env = replica_project
    model = report(project, "model.json")
    assert (model["preset"], model["name_or_path"], model["torch_dtype"]) == (
        "nemotron-3-nano-30b-a3b", str(replica), "bfloat16"
    )  # fmt: skip
    assert all(model["chat_template_checks"].values())  # thinking off: the prompt is a prefix of the conversation
    train = report(project, "train.json")
    assert train["coverage"]["passed"] and train["global_step"] == 4
    assert all(train["trainable_params_by_block"][block] > 0 for block in ("mamba", "attention", "moe_shared_expert"))
    merge = report(project, "merge.json")
    assert merge["success"] and merge["dtype"] == "bfloat16"
    assert merge["parity_metric"] == "mean_abs_answer_logprob_diff"
    evaluation = report(project, "eval.json")
    assert evaluation["primary_metric"] == "medmcqa_chat/acc" and evaluation["gate"]["n_paired"] == 12
    promotion = report(project, "promotion.json")
    # A random replica cannot pass the production gates (min_value 0.30 accuracy): rejected, with the reasons.
    assert promotion["decision"] == "rejected" and any(r.startswith("FAIL min_value") for r in promotion["reasons"])
    assert "up to date" in run(["dvc", "status"], project, env).lower()


def test_merged_model_has_the_checkpoint_layout_and_the_template_scored_is_thinking_off(replica_project):
    from medlora.modeling.checkpoint import checkpoint_files, layout_difference, read_layout

    project, replica, _ = replica_project
    merged = project / "outputs" / "merged"
    assert layout_difference(read_layout(checkpoint_files(replica)), read_layout(checkpoint_files(merged))) == []
    assert json.loads((merged / "config.json").read_text()) == json.loads((replica / "config.json").read_text())
    samples = [
        json.loads(line) for line in (project / "outputs/eval/merged/medmcqa_chat.jsonl").read_text().splitlines()
    ]
    context = samples[0]["context"]
    assert context.startswith("<|im_start|>system\n")  # the template always emits a system block
    assert context.endswith("<|im_start|>assistant\n<think></think>The correct answer is")  # thinking off
    # The merged weights are not in the DVC cache (dvc.yaml: cache false): outputs/ holds the only copy here.
    weights = {sha256_file(path) for path in merged.glob("*.safetensors")}
    assert not any(sha256_file(path) in weights for path in (project / ".dvc" / "cache").rglob("*") if path.is_file())
