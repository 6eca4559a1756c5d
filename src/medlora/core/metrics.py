"""Compact stage metrics for `dvc exp show` and `dvc metrics show`: `reports/metrics/<stage>.json`.

The full reports (`reports/<stage>.json`) stay as they are: other tools read their names and keys, and they hold
breakdowns (accuracy per subject and choice type, rule results, dropped ids) that would turn DVC's experiment table
into hundreds of columns. Each stage that has figures worth comparing across experiments also writes a small file
of scalars here; `dvc.yaml` declares these files as the stages' cached metrics, so DVC keeps them for every
experiment (the full reports are git-ignored and uncached, so a temp or queued experiment's copy is lost).

`core/stage.py` writes them beside each report (`write_metrics(report, reports_dir)`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlora.core.contracts import Report
from medlora.core.io import write_json

METRICS_DIR = "metrics"  # under paths.reports_dir


def _pick(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: data.get(key) for key in keys}


def _version(entry: dict[str, Any] | None) -> int | None:
    """A registered version's number as a number (the registry's strings would not sort or compare in DVC)."""
    if not entry or entry.get("version") in (None, ""):
        return None
    return int(entry["version"])


def _number(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _validate(data: dict[str, Any]) -> dict[str, Any]:
    return _pick(data, "success", "rows_in", "rows_kept", "rows_quarantined")


def _model(data: dict[str, Any]) -> dict[str, Any]:
    return _pick(data, "num_parameters")


def _format(data: dict[str, Any]) -> dict[str, Any]:
    return _pick(data, "rows_kept", "rows_dropped", "rows_truncated", "train_rows", "early_stop_rows")


def _train(data: dict[str, Any]) -> dict[str, Any]:
    passed = (data.get("coverage") or {}).get("passed")
    return {
        **_pick(data, "global_step", "train_loss", "eval_loss_initial", "eval_loss_final", "trainable_params"),
        "coverage_passed": passed if isinstance(passed, bool) else None,
        "tokens_per_second": data.get("tokens_per_second"),
    }


def _merge(data: dict[str, Any]) -> dict[str, Any]:
    return _pick(data, "success", "max_abs_logit_diff", "mean_abs_answer_logprob_diff")


def _evaluate(data: dict[str, Any]) -> dict[str, Any]:
    gate = data.get("gate") or {}
    adapter = (data.get("results") or {}).get("adapter") or {}
    return {
        "gate": _pick(gate, "metric", "base", "adapter", "merged", "uplift", "p_value", "merged_vs_adapter"),
        # One headline figure per accuracy task; the per-subject and per-choice-type figures stay in eval.json.
        "adapter_acc": {
            task: values["acc"] for task, values in adapter.items() if isinstance(values, dict) and "acc" in values
        },
    }


def _register(data: dict[str, Any]) -> dict[str, Any]:
    return {"adapter_version": _version(data.get("adapter")), "merged_version": _version(data.get("merged"))}


def _promote(data: dict[str, Any]) -> dict[str, Any]:
    champion = data.get("champion_after") or {}
    candidate = data.get("candidate") or {}
    adapter_name = next(iter(candidate), None)
    return {
        "promoted": data.get("decision") == "promoted",
        "forced": bool(data.get("forced")),
        "candidate_version": _number(candidate.get(adapter_name)) if adapter_name else None,
        "champion_version": _number(champion.get(adapter_name)) if adapter_name else None,
        "gates_failed": sum(1 for reason in data.get("reasons") or [] if str(reason).startswith("FAIL")),
    }


# Keyed by Report.STAGE. A stage missing here (params) writes no metrics file.
COMPACT: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "validate": _validate,
    "model": _model,
    "format": _format,
    "train": _train,
    "merge": _merge,
    "evaluate": _evaluate,
    "register": _register,
    "promote": _promote,
}


def metrics_path(reports_dir: str | Path, stage: str) -> Path:
    return Path(reports_dir) / METRICS_DIR / f"{stage}.json"


def compact(report: Report) -> dict[str, Any] | None:
    """The scalars of `report` worth a column in `dvc exp show`, or None for a stage without any."""
    pick = COMPACT.get(report.STAGE)
    return pick(report.to_dict()) if pick else None


def write_metrics(report: Report, reports_dir: str | Path) -> Path | None:
    """Write `reports/metrics/<stage>.json` for `report`; returns its path (None when the stage has none)."""
    values = compact(report)
    if values is None:
        return None
    path = metrics_path(reports_dir, report.STAGE)
    write_json(path, values)
    return path
