"""What the train stage watches while it runs: metrics to MLflow, progress with ETA, and the health checks.

The health checks map symptoms to the seed's "Common Issues" table:

    | Loss explodes       | LR too high | Reduce `learning_rate` by 10x                          |
    | Loss plateaus early | LR too low  | Increase `learning_rate`                               |
    | Eval loss diverges  | Overfitting | Increase `lora_dropout`, reduce epochs                 |
    | OOM errors          | Batch large | Reduce `batch_size`, increase `gradient_accumulation`  |

A NaN or exploding loss stops training (TrainingHealthError); an eval loss that climbs while the train loss falls
logs a warning. `history_rows` turns the trainer's log history into the rows of reports/train_history.csv.
"""

from __future__ import annotations

import csv
import datetime
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medlora.core.io import atomic_path

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ("step", "train_loss", "eval_loss", "learning_rate", "grad_norm")


class TrainingHealthError(RuntimeError):
    """Training stopped because the loss went NaN/inf or exploded; the message says what to change."""


def loss_problem(loss: float, first_loss: float | None, factor: float, learning_rate: float) -> str | None:
    """Why `loss` means training has diverged, with the seed's fix, or None when it looks healthy. Pure."""
    fix = (
        f"Common Issues: 'Loss explodes' -> likely cause 'LR too high' -> fix: reduce train.learning_rate by 10x "
        f"(now {learning_rate:g}, try {learning_rate / 10:g})"
    )
    if not math.isfinite(loss):
        return f"loss is {loss} (not finite). {fix}"
    if first_loss is not None and first_loss > 0 and loss > factor * first_loss:
        return (
            f"loss {loss:.4g} exceeds train.loss_explosion_factor ({factor:g}) x the first logged loss "
            f"({first_loss:.4g}). {fix}"
        )
    return None


def is_overfitting(evals: list[tuple[int, float]], trains: list[tuple[int, float]]) -> bool:
    """True when the last eval loss rose over the one before while train loss fell over the same steps. Pure."""
    if len(evals) < 2:
        return False
    (step_a, eval_a), (step_b, eval_b) = evals[-2], evals[-1]
    before = [loss for step, loss in trains if step <= step_a]
    after = [loss for step, loss in trains if step_a < step <= step_b]
    return eval_b > eval_a and bool(before) and bool(after) and after[-1] < before[-1]


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TrainingMonitor(TrainerCallback):
    """Logs each logging step to MLflow and as one line with rate and ETA; stops on a diverging loss."""

    def __init__(self, learning_rate: float, explosion_factor: float, log_to_mlflow: bool = True) -> None:
        self.learning_rate = learning_rate
        self.explosion_factor = explosion_factor
        self.log_to_mlflow = log_to_mlflow
        self.first_loss: float | None = None
        self.evals: list[tuple[int, float]] = []
        self.trains: list[tuple[int, float]] = []
        self.tokens_per_second: list[float] = []
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, the restored log history holds the original first loss: explosion is judged against it.
        self.first_loss = next((e["loss"] for e in state.log_history if "loss" in e), None)
        self.start_step = state.global_step
        self.start_time = self.last_time = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return control  # the end-of-training summary: nothing per-step in it
        step, now = state.global_step, time.monotonic()
        metrics = {}
        if "loss" in logs:
            metrics["train_loss"] = float(logs["loss"])
            self.trains.append((step, metrics["train_loss"]))
            if self.first_loss is None and math.isfinite(metrics["train_loss"]):
                self.first_loss = metrics["train_loss"]
            tokens = state.num_input_tokens_seen - self.last_tokens
            if now > self.last_time and tokens > 0:
                metrics["tokens_per_second"] = tokens / (now - self.last_time)
                self.tokens_per_second.append(metrics["tokens_per_second"])
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        if "eval_loss" in logs:
            metrics["eval_loss"] = float(logs["eval_loss"])
            self.evals.append((step, metrics["eval_loss"]))
        for key in ("learning_rate", "grad_norm"):
            if logs.get(key) is not None:
                metrics[key] = float(logs[key])
        metrics["peak_memory_mb"] = peak_memory_mb()
        if self.log_to_mlflow:
            import mlflow

            # MLflow refuses NaN in some stores; the health check below reports it anyway.
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
        self.log_progress(step, state.max_steps, metrics, now)
        for key in ("train_loss", "eval_loss"):
            if key in metrics:
                problem = loss_problem(metrics[key], self.first_loss, self.explosion_factor, self.learning_rate)
                if problem:
                    raise TrainingHealthError(f"training stopped at step {step}: {key}: {problem}")
        if "eval_loss" in metrics and is_overfitting(self.evals, self.trains):
            logger.warning(
                "eval loss rose (%.4f -> %.4f) while train loss fell: overfitting. Common Issues: 'Eval loss "
                "diverges' -> fix: increase lora.lora_dropout, reduce train.max_steps / num_train_epochs",
                self.evals[-2][1],
                self.evals[-1][1],
            )
        return control

    def log_progress(self, step: int, max_steps: int, metrics: dict[str, float], now: float) -> None:
        done = step - self.start_step
        rate = done / (now - self.start_time) if done and now > self.start_time else 0.0
        eta = datetime.timedelta(seconds=round((max_steps - step) / rate)) if rate else "?"
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("peak_memory_mb",))
        logger.info("step %d/%d %s | %.2f steps/s, ETA %s", step, max_steps, shown, rate, eta)


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step (train and eval logs of the same step merged), in step order. Pure."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        row = rows.setdefault(int(entry["step"]), dict.fromkeys(HISTORY_COLUMNS) | {"step": int(entry["step"])})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        for key in ("eval_loss", "learning_rate", "grad_norm"):
            if entry.get(key) is not None:
                row[key] = entry[key]
    return [rows[step] for step in sorted(rows)]


def write_history(rows: list[dict[str, Any]], path: str | Path) -> None:
    """reports/train_history.csv (step, train_loss, eval_loss, learning_rate, grad_norm), written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def plot_losses(rows: list[dict[str, Any]], path: str | Path) -> None:
    """reports/plots/train_loss.png: train and eval loss against step (PNG: DVC's HTML plots need a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
    axes.set_xlabel("step")
    axes.set_ylabel("loss (answer tokens)")
    axes.set_title("LoRA training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
