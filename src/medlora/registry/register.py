"""The `register` stage's verb and the registry's read side (`medlora status`).

Each pipeline run registers two versions, linked to the pipeline's MLflow run (`mlflow_run_id` in
`reports/train.json`): the adapter (`register.adapter_name`, a pyfunc that ships its base reference, see
adapter_model) and the merged model (`register.merged_name`, MLflow's transformers flavor, servable with
`mlflow models serve`). Versions carry the lineage and the evaluation as tags, and the content hash of the adapter
(`adapter_sha256`), so registering the same outputs twice finds the existing version instead of adding one.
New versions get the alias `challenger`; only the promote stage gives out `champion` (see promotion).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.registry.gates import Champion, Verdict, candidate_from_gate, champion_from_tags, gate_tags, should_promote
from medlora.core.io import read_json
from medlora.modeling.presets import directory_hash
from medlora.core.tracking import configure_tracking, dvc_lock_md5, lineage_tags, resume_pipeline_run, tracking_uri

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryError(RuntimeError):
    """The tracking store could not be read or written; the message says which step and what state it left."""


def pip_requirements() -> list[str]:
    """Pinned requirements of a registered model (explicit: MLflow's inference adds torchvision, FINDINGS)."""
    from importlib.metadata import version

    packages = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def open_registry(params: Params) -> Any:
    """An MlflowClient on the project's store; raises RegistryError naming the store when it cannot be reached."""
    from mlflow import MlflowClient

    try:
        configure_tracking(params)
        return MlflowClient()
    except Exception as error:  # MLflow raises several types (MlflowException, requests, sqlalchemy errors)
        raise RegistryError(
            f"tracking store {tracking_uri(params.paths.mlruns_dir)} is unreachable: {error}. Nothing was changed."
        ) from error


def find_version(client: Any, name: str, tags: dict[str, str]) -> Any | None:
    """The newest version of `name` carrying all `tags`, or None (also when the model does not exist yet)."""
    conditions = " and ".join([f"name='{name}'", *(f"tags.{key}='{value}'" for key, value in tags.items())])
    versions = client.search_model_versions(conditions)
    return max(versions, key=lambda v: int(v.version)) if versions else None


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """Which version of `name` holds `alias` (None when the alias or the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def current_champion(client: Any, name: str) -> Champion | None:
    """The champion of registered model `name`, with the metric it was promoted on (from its version tags)."""
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None
    return champion_from_tags(version, client.get_model_version(name, version).tags)


def coverage_verdict(train_report: dict[str, Any]) -> bool | None:
    """The LoRA coverage gate's verdict in reports/train.json `coverage` (a bool or an object with `passed`)."""
    coverage = train_report.get("coverage")
    if isinstance(coverage, bool) or coverage is None:
        return coverage
    if isinstance(coverage, dict):
        for key in ("passed", "success", "ok"):
            if isinstance(coverage.get(key), bool):
                return coverage[key]
    if isinstance(coverage, str):
        return {"passed": True, "pass": True, "failed": False, "fail": False}.get(coverage.lower())
    return None


def read_reports(params: Params) -> dict[str, Any]:
    """What registration and promotion read from earlier stages: run id, eval gate, the two verdicts."""
    reports = Path(params.paths.reports_dir)
    train = read_json(reports / "train.json")
    evaluation = read_json(reports / "eval.json")
    validation = read_json(reports / "validation.json")
    if not train.get("mlflow_run_id"):
        raise ValueError(f"{reports / 'train.json'} has no mlflow_run_id: was it written by the train stage?")
    if not isinstance(evaluation.get("gate"), dict):
        raise ValueError(f"{reports / 'eval.json'} has no `gate` object: run the evaluate stage")
    return {
        "mlflow_run_id": train["mlflow_run_id"],
        "gate": evaluation["gate"],
        "validation_passed": validation.get("success"),
        "coverage_passed": coverage_verdict(train),
    }


def version_tags(params: Params, reports: dict[str, Any], adapter_sha256: str) -> dict[str, str]:
    """Tags both versions of one pipeline run carry: lineage, DVC hashes, evaluation and verdicts."""
    return {
        **lineage_tags(params),
        "adapter_dvc_md5": dvc_lock_md5("train", params.paths.adapter_dir),
        "merged_dvc_md5": dvc_lock_md5("merge", params.paths.merged_dir),
        "adapter_sha256": adapter_sha256,
        "mlflow_run_id": reports["mlflow_run_id"],
        **gate_tags(reports["gate"]),
        "validation_success": str(reports["validation_passed"]),
        "coverage_passed": str(reports["coverage_passed"]),
    }


def registration_verdict(client: Any, params: Params, reports: dict[str, Any]) -> Verdict:
    """The gates against the current champion, as the promote stage will run them."""
    candidate, base = candidate_from_gate(reports["gate"], reports["validation_passed"], reports["coverage_passed"])
    return should_promote(candidate, base, current_champion(client, params.register.adapter_name), params.promote)


def register_one(client: Any, params: Params, kind: str, identity: dict[str, str], tags: dict[str, str]) -> dict:
    """Find the version of this kind with these identity tags, or log the model to the pipeline run and register it.

    Returns {"name", "version", "created", "run_id"}. A reused version gets its tags refreshed (a re-evaluation of
    the same weights changes the gate tags, not the weights).
    """
    import mlflow

    from medlora.registry.adapter_model import log_adapter_model

    name = params.register.adapter_name if kind == "adapter" else params.register.merged_name
    existing = find_version(client, name, identity)
    if existing is not None:
        for key, value in tags.items():
            client.set_model_version_tag(name, existing.version, key, value)
        logger.info("%s: outputs already registered as version %s, not adding another", name, existing.version)
        return {"name": name, "version": str(existing.version), "created": False, "run_id": existing.run_id}
    with resume_pipeline_run(params, tags["mlflow_run_id"]):
        if kind == "adapter":
            info = log_adapter_model(params.paths.adapter_dir, params.paths.base_model_dir, pip_requirements())
        else:
            info = mlflow.transformers.log_model(
                str(Path(params.paths.merged_dir).resolve()),
                name="merged",
                task="text-generation",
                pip_requirements=pip_requirements(),
                # Greedy, continuation only: the same question always gets the same answer.
                model_config={"max_new_tokens": 8, "do_sample": False, "return_full_text": False},
            )
        version = mlflow.register_model(info.model_uri, name, tags={**tags, **identity, "kind": kind})
        mlflow.set_tag(f"registered.{kind}", f"{name}/{version.version}")
    logger.info("%s: registered version %s from run %s", name, version.version, tags["mlflow_run_id"])
    return {"name": name, "version": str(version.version), "created": True, "run_id": version.run_id}


def mark_challenger(client: Any, entry: dict[str, Any]) -> None:
    """`challenger` on a candidate version, unless it already is the champion."""
    if alias_version(client, entry["name"], CHAMPION) != entry["version"]:
        client.set_registered_model_alias(entry["name"], CHALLENGER, entry["version"])


def register(params: Params) -> dict[str, Any]:
    """The `register` stage: register adapter (and merged) versions of this pipeline run; returns the report."""
    reports = read_reports(params)
    client = open_registry(params)
    adapter_sha256 = directory_hash(params.paths.adapter_dir)
    tags = version_tags(params, reports, adapter_sha256)
    adapter = register_one(client, params, "adapter", {"adapter_sha256": adapter_sha256}, tags)
    mark_challenger(client, adapter)
    verdict = registration_verdict(client, params, reports)
    merged, skipped = None, None
    if params.register.register_merged == "always" or verdict.promote:
        identity = {"adapter_sha256": adapter_sha256, "merged_sha256": directory_hash(params.paths.merged_dir)}
        merged = register_one(client, params, "merged", identity, tags)
        mark_challenger(client, merged)
        client.set_model_version_tag(adapter["name"], adapter["version"], "merged_version", merged["version"])
        client.set_model_version_tag(merged["name"], merged["version"], "adapter_version", adapter["version"])
    else:
        skipped = "register.register_merged is if_promotable and the gates fail: " + "; ".join(verdict.failed)
        logger.info("merged model not registered: %s", skipped)
    return {
        "mlflow_run_id": reports["mlflow_run_id"],
        "tracking_uri": tracking_uri(params.paths.mlruns_dir),
        "adapter": adapter,
        "merged": merged,
        "merged_skipped": skipped,
        "gates_at_registration": verdict.reasons,
        "tags": tags,
    }


def status_rows(client: Any, params: Params) -> list[dict[str, str]]:
    """One row per adapter version, newest first: aliases of it and of its merged twin, and the key metrics."""
    from mlflow.exceptions import MlflowException

    def aliases_of(name: str) -> dict[str, list[str]]:
        try:
            by_alias = client.get_registered_model(name).aliases
        except MlflowException:
            return {}
        found: dict[str, list[str]] = {}
        for alias, version in by_alias.items():
            found.setdefault(str(version), []).append(alias)
        return found

    names = params.register
    adapter_aliases, merged_aliases = aliases_of(names.adapter_name), aliases_of(names.merged_name)
    rows = []
    for version in sorted(client.search_model_versions(f"name='{names.adapter_name}'"), key=lambda v: -int(v.version)):
        tags, merged = version.tags, version.tags.get("merged_version", "-")
        rows.append(
            {
                "adapter": str(version.version),
                "merged": merged,
                "aliases": ",".join(sorted(adapter_aliases.get(str(version.version), []))) or "-",
                "merged_aliases": ",".join(sorted(merged_aliases.get(merged, []))) or "-",
                "metric": tags.get("gate.metric", "-"),
                "adapter_value": _number_text(tags.get("gate.adapter", "-")),
                "base": _number_text(tags.get("gate.base", "-")),
                "p_value": _number_text(tags.get("gate.p_value", "-")),
                "validation": tags.get("validation_success", "-"),
                "coverage": tags.get("coverage_passed", "-"),
                "run": (version.run_id or "-")[:8],
                "commit": tags.get("git_commit", "-")[:8],
            }
        )
    return rows


def _number_text(value: str) -> str:
    """A tag holding a number, to 4 significant digits (tags are strings; "None" and "-" stay as they are)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows as aligned text columns, headed by the keys."""
    if not rows:
        return "no registered versions yet (run the pipeline: make run)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def status_command(args: Any) -> int:
    """`medlora status`: the table of registered versions, aliases and key metrics."""
    from medlora.core.config import load_params

    params = load_params(args.params)
    print(format_table(status_rows(open_registry(params), params)))
    return 0


def promote_command(args: Any) -> int:
    """`medlora promote VERSION [--force --reason TEXT]`: see promotion.promote_version."""
    from medlora.registry.promote import promote_command as command

    return command(args)


def rollback_command(args: Any) -> int:
    """`medlora rollback`: see promotion.rollback."""
    from medlora.registry.promote import rollback_command as command

    return command(args)
