"""Train-stage settings (thread counts, param variants) on the embedded default: wall time, tokens/s and the
answer-token loss before/after. (Batching throughput is benchmarks/train_throughput.py.)

    .venv/bin/python benchmarks/train_settings.py [--threads 1 2] [--repeats N]
        [--variant train.learning_rate=0.005,...] [--rows 2000] [--steps 80] [--keep DIR]
    .venv/bin/python benchmarks/train_settings.py --smoke --keep /tmp/bench   # 200 rows, 4 steps, 1 thread

Builds the inputs the way the pipeline does (synthetic snapshot train split -> tiny NemotronH base -> format) in
a temp directory, then runs `pipelines/train.py` there once per thread count with params.yaml's `lora`/`train`
sections (each --variant overrides some `section.key=value`), each in a fresh process (OMP_NUM_THREADS must be
set before torch loads). Runs alternate between thread counts and variants: CPU timings on 2 shared cores drift
(FINDINGS). `--rows` sets `snapshot.train_size`, `--steps` sets `train.max_steps`; `--smoke` is a tiny run for
tests (200 rows, 4 steps with an eval every 2, 20 early-stopping rows, 1 thread; sizes can still be given).

The train stage's log (its per-step progress) goes to stderr and to DIR/train-<run>.log; each run's figures (from
reports/train.json and train_history.csv) are printed on stdout as one line per run; the last line on stdout is
one JSON object with every run, each with its eval (answer-token) loss curve.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# --smoke: small enough for a test, still with an eval after step 2 and 4 so the loss curve has an "after".
SMOKE_ROWS, SMOKE_STEPS = 200, 4
SMOKE_OVERRIDES = {
    "train": {"eval_steps": 2, "logging_steps": 1, "save_steps": 4, "warmup_steps": 1},
    "format": {"early_stopping_size": 20},
}
REPORT_KEYS = (
    "global_step",
    "train_seconds",
    "train_tokens",
    "tokens_per_second",
    "eval_loss_initial",
    "eval_loss_final",
    "peak_memory_mb",
)

log = logging.getLogger("benchmark")


def bench_params(rows: int | None, steps: int | None, smoke: bool) -> dict[str, Any]:
    """params.yaml as a dict, with the benchmark's sizes (and the smoke overrides) applied."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    if smoke:
        for section, values in SMOKE_OVERRIDES.items():
            raw[section] |= values
    rows = rows or (SMOKE_ROWS if smoke else None)
    steps = steps or (SMOKE_STEPS if smoke else None)
    if rows:
        raw["snapshot"]["train_size"] = rows
    if steps:
        raw["train"]["max_steps"] = steps
    raw["paths"] |= {"formatted_dir": "outputs/formatted", "base_model_dir": "outputs/base_model"}
    return raw


def build_inputs(work: Path, params: Any) -> Any:
    """validated/train.jsonl, outputs/base_model and outputs/formatted under `work`; returns the FormatReport."""
    from medlora.core.io import write_jsonl
    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import build_base_model
    from medlora.modeling.formatting import format_training_data

    snap = params.snapshot
    train_rows = generate_splits(snap.seed, snap.train_size, 0, 0)["train"]
    write_jsonl(work / "validated" / "train.jsonl", train_rows)
    build_base_model(params.model, train_rows, work / params.paths.base_model_dir)
    return format_training_data(
        work / "validated" / "train.jsonl",
        work / params.paths.base_model_dir,
        work / params.paths.formatted_dir,
        params.format,
    )


def eval_loss_curve(history: Path) -> dict[int, float]:
    """step -> eval loss from reports/train_history.csv (steps without an eval are skipped)."""
    with history.open(encoding="utf-8", newline="") as handle:
        return {
            int(row["step"]): round(float(row["eval_loss"]), 3) for row in csv.DictReader(handle) if row["eval_loss"]
        }


def run_once(work: Path, raw: dict, variant: str, threads: int, number: int) -> dict:
    """One train-stage process with `variant` applied to `raw` and OMP_NUM_THREADS=`threads`; its figures."""
    from medlora.core.contracts import TrainReport

    raw = copy.deepcopy(raw)
    for assignment in filter(None, variant.split(",")):
        key, value = assignment.split("=", 1)
        section, name = key.split(".", 1)
        raw[section][name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    for stale in ("outputs/checkpoints", "outputs/adapter"):  # a repeated variant must not resume
        shutil.rmtree(work / stale, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the run goes to DIR/mlruns, never to a store set elsewhere
    stage_log = work / f"train-{number}.log"
    log.info("run %d: %s, %d thread(s) ... (log: %s)", number, variant or "params.yaml", threads, stage_log)
    start = time.monotonic()
    command = [sys.executable, str(ROOT / "pipelines" / "train.py")]
    with (
        stage_log.open("w", encoding="utf-8") as saved,
        subprocess.Popen(
            command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as process,
    ):
        for line in process.stderr:  # the stage's log (its per-step progress) to our stderr and to the file
            sys.stderr.write(line)
            saved.write(line)
    if process.returncode != 0:
        raise SystemExit(f"train stage failed (exit {process.returncode}); its log: {stage_log}")
    report = TrainReport.read(work / "reports")
    run = {
        "variant": variant or "params.yaml",
        "threads": threads,
        "stage_wall_seconds": round(time.monotonic() - start, 1),
    }
    figures = {key: getattr(report, key) for key in REPORT_KEYS}
    return run | figures | {"eval_loss_curve": eval_loss_curve(work / "reports" / "train_history.csv")}


def describe(run: dict) -> str:
    return (
        f"{run['variant']}, {run['threads']} thread(s): {run['global_step']} steps, train {run['train_seconds']:.1f} s "
        f"({run['tokens_per_second']:.0f} tokens/s, stage process {run['stage_wall_seconds']:.1f} s), eval loss "
        f"{run['eval_loss_initial']:.3f} -> {run['eval_loss_final']:.3f}, peak {run['peak_memory_mb']:.0f} MB"
    )


def main() -> None:
    from medlora.core.config import parse_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="OMP_NUM_THREADS values (1 2)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", action="append", default=None, help="section.key=value[,...] overrides")
    parser.add_argument("--rows", type=int, default=None, help="snapshot.train_size (default params.yaml's)")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default params.yaml's)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests (see the module docstring)")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    threads = args.threads or ([1] if args.smoke else [1, 2])
    raw = bench_params(args.rows, args.steps, args.smoke)
    params = parse_params(raw, "params.yaml (benchmark sizes)")
    started = time.monotonic()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="medlora-bench-") as tmp
    ):
        work = Path(tmp)
        formatted = build_inputs(work, params)
        log.info("inputs: %s", formatted.summary())
        runs = []
        for _ in range(args.repeats):
            for variant in args.variant or [""]:
                for count in threads:
                    runs.append(run_once(work, raw, variant, count, len(runs) + 1))
                    print(describe(runs[-1]), flush=True)
    summary = {
        "rows": params.snapshot.train_size,
        "train_rows": formatted.train_rows,
        "early_stop_rows": formatted.early_stop_rows,
        "max_steps": params.train.max_steps,
        "batch_size": params.train.per_device_train_batch_size,
        "runs": runs,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
