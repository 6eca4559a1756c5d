"""Train-stage settings (thread counts, param variants) on the embedded default: wall time, tokens/s and the
answer-token loss before/after. (Batching throughput is benchmarks/train_throughput.py.)

    python benchmarks/train_settings.py [--threads 1 2] [--repeats N] [--variant train.learning_rate=0.005,...]

Builds the inputs the way the pipeline does (synthetic snapshot train split -> tiny NemotronH base -> format) in
a temp directory, then runs `pipelines/train.py` there once per thread count with params.yaml's `lora`/`train`
sections (each --variant overrides some `section.key=value`), each in a fresh process (OMP_NUM_THREADS must be
set before torch loads). Runs alternate between thread counts and variants: CPU timings on 2 shared cores drift
(FINDINGS). Prints one JSON line per run, with the eval (answer-token) loss curve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_inputs(work: Path, params) -> None:
    from medlora.core.io import write_jsonl
    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import build_base_model
    from medlora.modeling.formatting import format_training_data

    snap = params.snapshot
    train_rows = generate_splits(snap.seed, snap.train_size, 0, 0)["train"]
    write_jsonl(work / "validated" / "train.jsonl", train_rows)
    build_base_model(params.model, train_rows, work / "outputs" / "base_model")
    format_training_data(
        work / "validated" / "train.jsonl",
        work / "outputs" / "base_model",
        work / "outputs" / "formatted",
        params.format,
    )


def run_once(work: Path, raw: dict, variant: str, threads: int) -> dict:
    raw = json.loads(json.dumps(raw))
    for assignment in filter(None, variant.split(",")):
        key, value = assignment.split("=", 1)
        section, name = key.split(".", 1)
        raw[section][name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    for stale in ("outputs/checkpoints", "outputs/adapter"):  # a repeated variant must not resume
        shutil.rmtree(work / stale, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.monotonic()
    subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "train.py")],
        cwd=work,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=(work / f"train-{threads}.log").open("w"),
    )
    report = json.loads((work / "reports" / "train.json").read_text())
    history = (work / "reports" / "train_history.csv").read_text().splitlines()[1:]
    curve = {int(r.split(",")[0]): round(float(r.split(",")[2]), 3) for r in history if r.split(",")[2]}
    keys = (
        "global_step",
        "train_seconds",
        "tokens_per_second",
        "eval_loss_initial",
        "eval_loss_final",
        "peak_memory_mb",
    )
    run = {
        "variant": variant or "params.yaml",
        "threads": threads,
        "stage_wall_seconds": round(time.monotonic() - start, 1),
    }
    return run | {k: report[k] for k in keys} | {"eval_loss_curve": curve}


def main() -> None:
    from medlora.core.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", action="append", default=None, help="section.key=value[,...] overrides")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="medlora-train-bench-") as tmp:
        work = Path(tmp)
        build_inputs(work, params)
        raw = params.to_dict()
        raw["paths"] |= {"formatted_dir": "outputs/formatted", "base_model_dir": "outputs/base_model"}
        for _ in range(args.repeats):
            for variant in args.variant or [""]:
                for threads in args.threads:
                    print(json.dumps(run_once(work, raw, variant, threads)), flush=True)


if __name__ == "__main__":
    main()
