"""`scripts/gpu_check.sh`: the production path on a GPU in minutes, on an offline replica of the hub checkpoint.

    bash scripts/gpu_check.sh                 # on a CUDA machine, from the project root
    python -m medlora.gpu_check --dry-run     # build the replica project, print what would run, stop

It copies the project's tracked files into a scratch directory, writes a replica of Nemotron-3-Nano-30B-A3B
(`medlora replica`, hub layout, bf16), points the production params file at it (only model.name_or_path, the data
source and sizes and the step counts change) and runs `dvc repro` there: bf16 on the GPU, the Mamba kernels, the
device map and the 8-bit optimizer all on the code path the real run takes. It ends with one JSON line of what
held. Without CUDA it stops before running anything (exit 3), saying what is missing; the same project builder
runs the replica pipeline on the CPU in tests/stages/test_replica_pipeline.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

PRODUCTION_PARAMS = Path("configs") / "nemotron-3-nano-30b-a3b.yaml"
# The only changes to the production params: a generated MedMCQA (the hub dataset may be unreachable), its sizes,
# and step counts that finish in minutes.
CHANGES: dict[str, dict[str, Any]] = {
    "snapshot": {"source": "synthetic", "train_size": 240, "validation_size": 24, "test_size": 8},
    "format": {"early_stopping_size": 16},
    "train": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1},
    "evaluate": {"limit": 12},
}
KERNELS = ("mamba_ssm", "causal_conv1d", "bitsandbytes")


CLONE_LEAVES_OUT = ("tests/", "data.dvc", "dvc.lock")  # what a scratch project starts without: no tests, no DVC state


def copy_tracked_files(source: str | Path, target: str | Path, leave_out: tuple[str, ...] = CLONE_LEAVES_OUT) -> Path:
    """`source`'s git-tracked files, as a fresh clone has them, copied into `target` but the names starting with
    `leave_out`; returns `target`. The end-to-end tests build their scratch projects with it too."""
    source, target = Path(source), Path(target)
    tracked = subprocess.run(["git", "ls-files"], cwd=source, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        if (source / name).is_file() and not name.startswith(leave_out):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
    return target


def replica_project(
    source: str | Path, root: str | Path, size: str = "tiny", changes: dict[str, dict[str, Any]] | None = None
) -> tuple[Path, Path]:
    """(project, replica): `source`'s git-tracked files (tests and DVC state left out) in `root`/medlora with the
    production params pointed at a replica of the hub checkpoint in `root`/replica."""
    from medlora.modeling.replica import build_replica

    source, root = Path(source), Path(root)
    project, replica = root / "medlora", root / "replica"
    copy_tracked_files(source, project)
    params = yaml.safe_load((source / PRODUCTION_PARAMS).read_text(encoding="utf-8"))
    params["model"]["name_or_path"] = str(replica)
    for section, values in (CHANGES if changes is None else changes).items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    build_replica(replica, size)
    return project, replica


def environment() -> dict[str, Any]:
    """What this machine offers the GPU path: CUDA, the device, the kernels and bitsandbytes."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        **{name: importlib.util.find_spec(name) is not None for name in KERNELS},
    }


def summarize(project: Path) -> dict[str, Any]:
    """What held, from the stage reports the run wrote."""

    def read(name: str) -> dict[str, Any]:
        path = project / "reports" / name
        return json.loads(path.read_text()) if path.is_file() else {}

    train, merge, evaluation = read("train.json"), read("merge.json"), read("eval.json")
    return {
        "train_device": train.get("device"),
        "train_batching": train.get("batching"),
        "train_tokens_per_second": train.get("tokens_per_second"),
        "train_peak_memory_mb": train.get("peak_memory_mb"),
        "coverage_passed": train.get("coverage", {}).get("passed"),
        "merge_dtype": merge.get("dtype"),
        "merge_parity": merge.get("success"),
        "evaluated": sorted(evaluation.get("results", {})),
        "promotion": read("promotion.json").get("decision"),
    }


def dvc_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env |= {"GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu-check@localhost"}
    env |= {"GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu-check@localhost"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the scratch project's own store, never a shared server
    return env


def run_pipeline(project: Path) -> None:
    """git init, snapshot, commit, dvc repro in the scratch project; raises CalledProcessError on a failure."""
    env = dvc_env()
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "medlora.cli", "snapshot", "--source", "synthetic"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "gpu check"],
        [sys.executable, "-m", "dvc", "repro"],
    ):
        subprocess.run(command, cwd=project, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="replica size (medlora replica --size)")
    parser.add_argument("--keep", default=None, help="scratch directory to keep (default: a temp dir, removed)")
    parser.add_argument("--dry-run", action="store_true", help="build the replica project and stop")
    args = parser.parse_args(argv)
    found = environment()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medlora-gpu-check-"))
    result: dict[str, Any] = {"environment": found, "scratch": str(root)}
    if not found["cuda"] and not args.dry_run:
        result["held"] = False
        result["reason"] = "no CUDA device: this check needs a GPU (tests run the replica pipeline on the CPU)"
        print(json.dumps(result))
        return 3
    project, replica = replica_project(Path.cwd(), root, args.size)
    result |= {"project": str(project), "replica": str(replica)}
    if args.dry_run:
        result["would_run"] = "dvc repro"
        print(json.dumps(result))
        return 0
    try:
        run_pipeline(project)
        result |= summarize(project)
        result["held"] = bool(result["merge_parity"] and result["coverage_passed"] and result["train_device"] == "cuda")
    except subprocess.CalledProcessError as error:
        result |= {**summarize(project), "held": False, "failed": " ".join(map(str, error.cmd))}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["held"] else 1


if __name__ == "__main__":
    sys.exit(main())
