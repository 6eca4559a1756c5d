"""From the harness's output to what people and later stages read: eval.json, per-sample logs, plot, MLflow.

Every figure here is lm-eval's own: aggregates from `results`, per-question values from `samples` (for the paired
test and the per-subject breakdown). Nothing is re-scored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import EvalReport, TrainReport
from medlora.core.io import atomic_directory, atomic_path, sha256_file, write_json, write_jsonl
from medlora.evaluation.significance import build_gate

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("acc", "acc_norm", "answer_loglik", "answer_greedy")
BREAKDOWN_COLUMNS: tuple[str, ...] = ("subject_name", "choice_type")
MODEL_COLORS = {"base": "#9e9e9e", "adapter": "#1f77b4", "merged": "#ff7f0e"}


def _number(value: Any) -> float | None:
    """A harness figure as a float, None for "N/A" (stderr of one sample) or NaN."""
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return None


def question_key(sample: dict[str, Any]) -> str:
    """The question a sample answered: its MedMCQA id (stable across models), else the harness's doc index."""
    return str(sample["doc"].get("id", sample["doc_id"]))


def breakdown(samples: list[dict[str, Any]], column: str) -> dict[str, dict[str, float]]:
    """Accuracy and count per value of a row column (subject_name, choice_type), from the harness's samples."""
    groups: dict[str, list[float]] = {}
    for sample in samples:
        groups.setdefault(str(sample["doc"].get(column) or "unknown"), []).append(float(sample["acc"]))
    return {key: {"acc": sum(values) / len(values), "n": len(values)} for key, values in sorted(groups.items())}


def summarize_task(task_results: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """acc/acc_norm (multiple choice) or answer_loglik/answer_greedy (log-likelihood) with stderrs, n, breakdowns."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        if f"{metric},none" in task_results:
            summary[metric] = _number(task_results[f"{metric},none"])
            summary[f"{metric}_stderr"] = _number(task_results.get(f"{metric}_stderr,none"))
    summary["n"] = len(samples)
    if "acc" in summary and samples and "acc" in samples[0]:
        for column in BREAKDOWN_COLUMNS:
            summary[f"by_{column}"] = breakdown(samples, column)
    return summary


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """What outputs/eval keeps of one harness sample: which question, what was scored, the model's figures."""
    doc = sample["doc"]
    return {
        "doc_id": sample["doc_id"],
        "id": doc.get("id"),
        "subject_name": doc.get("subject_name"),
        "choice_type": doc.get("choice_type"),
        "target": sample["target"],
        "context": sample["arguments"][0][0],
        "continuations": [argument[1] for argument in sample["arguments"]],
        "loglikelihoods": [response[0] for response in sample["filtered_resps"]],
        "is_greedy": [bool(response[1]) for response in sample["filtered_resps"]],
        **{metric: sample[metric] for metric in METRICS if metric in sample},
    }


def build_report(
    params: Params, tasks: list[str], primary: str, runs: dict[str, dict[str, Any]], wall_seconds: float
) -> EvalReport:
    """eval.json from the harness's output per model: {"gate", "results", "runs", ...}."""
    results = {
        model: {
            task: summarize_task(run["results"]["results"][task], run["results"]["samples"][task]) for task in tasks
        }
        for model, run in runs.items()
    }
    task, metric = primary.split("/")
    values = {model: results[model][task][metric] for model in runs}
    per_question = {
        model: {question_key(s): float(s[metric]) for s in run["results"]["samples"][task]}
        for model, run in runs.items()
    }
    return EvalReport(
        gate=build_gate(primary, values, per_question),
        primary_metric=primary,
        results=results,
        runs={
            model: {"model_args": run["model_args"], "wall_seconds": run["wall_seconds"]} for model, run in runs.items()
        },
        tasks=tasks,
        backend=params.evaluate.backend,
        source=params.evaluate.source,
        limit=params.evaluate.limit,
        batch_size=params.evaluate.batch_size,
        validation_file=str(Path(params.paths.validated_dir) / "validation.jsonl"),
        validation_sha256=sha256_file(Path(params.paths.validated_dir) / "validation.jsonl"),  # like with like
        wall_seconds=round(wall_seconds, 2),
    )


def write_samples(eval_dir: str | Path, tasks: list[str], runs: dict[str, dict[str, Any]]) -> None:
    """outputs/eval/<model>/<task>.jsonl (one line per question) and <model>/results.json, atomically."""
    with atomic_directory(eval_dir) as staging:
        for model, run in runs.items():
            for task in tasks:
                write_jsonl(
                    staging / model / f"{task}.jsonl", [sample_record(s) for s in run["results"]["samples"][task]]
                )
            harness = {key: run["results"].get(key) for key in ("results", "n-samples", "versions", "config")}
            write_json(staging / model / "results.json", json.loads(json.dumps(harness, default=str)))  # dtypes


def plot_subject_accuracy(report: EvalReport, path: str | Path) -> Path:
    """Grouped bars: accuracy per subject, one bar per model, one panel per multiple-choice task; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report.results
    models = list(results)
    tasks = [task for task in report.tasks if any("by_subject_name" in results[m][task] for m in models)]
    figure, axes = plt.subplots(max(len(tasks), 1), 1, figsize=(12, 4.2 * max(len(tasks), 1)), squeeze=False)
    for axis, task in zip(axes[:, 0], tasks, strict=False):
        subjects = sorted({s for m in models for s in results[m][task].get("by_subject_name", {})})
        width = 0.8 / len(models)
        for offset, model in enumerate(models):
            groups = results[model][task].get("by_subject_name", {})
            heights = [groups.get(s, {}).get("acc", 0.0) for s in subjects]
            positions = [i + (offset - (len(models) - 1) / 2) * width for i in range(len(subjects))]
            axis.bar(
                positions,
                heights,
                width,
                label=f"{model} ({results[model][task]['acc']:.3f})",
                color=MODEL_COLORS.get(model),
            )
        counts = {
            s: max(results[m][task].get("by_subject_name", {}).get(s, {}).get("n", 0) for m in models) for s in subjects
        }
        # MedMCQA has 21 subjects: slanted labels stay readable.
        axis.set_xticks(
            range(len(subjects)), [f"{s} (n={counts[s]})" for s in subjects], fontsize=8, rotation=30, ha="right"
        )
        axis.axhline(0.25, color="black", linestyle="--", linewidth=0.8, label="chance (4 options)")
        axis.set_ylim(0, 1)
        axis.set_ylabel("accuracy")
        axis.set_title(f"{task}: accuracy per subject")
        axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return path


def flat_metrics(report: EvalReport) -> dict[str, float]:
    """MLflow metric names -> values: `eval.<model>.<task>.<metric>` and `eval.gate.<key>` (numbers only)."""
    flat = {}
    for model, tasks in report.results.items():
        for task, summary in tasks.items():
            for key, value in summary.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    flat[f"eval.{model}.{task}.{key}"] = float(value)
        flat[f"eval.{model}.wall_seconds"] = float(report.runs[model]["wall_seconds"])
    for key, value in dataclasses.asdict(report.gate).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
            flat[f"eval.gate.{key}"] = float(value)
    flat["eval.wall_seconds"] = float(report.wall_seconds)
    return flat


def log_to_mlflow(params: Params, report: EvalReport, plot: Path) -> str:
    """Log the metrics, eval.json and the plot to the pipeline's MLflow run (reports/train.json `mlflow_run_id`).

    Returns the run id. Raises ContractError naming train.json when the train stage left no run id.
    """
    import mlflow

    from medlora.core.tracking import resume_pipeline_run

    reports = params.paths.reports_dir
    run_id = TrainReport.read(reports).require_run_id(reports)
    with resume_pipeline_run(params, run_id):
        mlflow.log_metrics(flat_metrics(report))
        mlflow.set_tag("eval.primary_metric", report.primary_metric)
        mlflow.log_dict(report.to_dict(), f"evaluate/{report.FILE}")
        mlflow.log_artifact(str(plot), artifact_path="evaluate")
    logger.info("evaluation logged to MLflow run %s", run_id)
    return run_id
