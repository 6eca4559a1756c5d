"""Train-stage throughput on the embedded default: wall time, tokens/s and answer-token loss before/after.

    python benchmarks/train_throughput.py [--threads 1 2] [--max-steps N]

Builds the inputs the way the pipeline does (synthetic snapshot train split -> tiny NemotronH base -> format) in
a temp directory, then runs `pipelines/train.py` there once per thread count with params.yaml's `lora`/`train`
sections, each in a fresh process (OMP_NUM_THREADS must be set before torch loads). Runs alternate between
thread counts when --repeats > 1: CPU timings on 2 shared cores drift (FINDINGS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_inputs(work: Path, params) -> None:
    from medlora.formatting import format_training_data
    from medlora.modeling import build_base_model
    from medlora.schema import write_jsonl
    from medlora.synthetic import generate_splits

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


def run_once(work: Path, threads: int) -> dict:
    for stale in ("outputs/checkpoints", "outputs/adapter"):
        subprocess.run(["rm", "-rf", str(work / stale)], check=True)
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
    keys = (
        "global_step",
        "train_seconds",
        "tokens_per_second",
        "eval_loss_initial",
        "eval_loss_final",
        "peak_memory_mb",
    )
    return {"threads": threads, "stage_wall_seconds": round(time.monotonic() - start, 1)} | {k: report[k] for k in keys}


def main() -> None:
    from medlora.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="default: train.max_steps in params.yaml")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    if args.max_steps:
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, max_steps=args.max_steps))
    with tempfile.TemporaryDirectory(prefix="medlora-train-bench-") as tmp:
        work = Path(tmp)
        build_inputs(work, params)
        raw = params.to_dict()
        raw["paths"] |= {"formatted_dir": "outputs/formatted", "base_model_dir": "outputs/base_model"}
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        results = [run_once(work, t) for _ in range(args.repeats) for t in args.threads]
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
