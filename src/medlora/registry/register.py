"""The `register` stage's verb: this pipeline run's adapter and merged model into the MLflow registry.

Each pipeline run registers two versions, linked to the pipeline's MLflow run (`mlflow_run_id` in
`reports/train.json`): the adapter (`register.adapter_name`, a pyfunc that ships its base reference, see
adapter_model) and the merged model (`register.merged_name`, MLflow's transformers flavor, servable with
`mlflow models serve`). Versions carry the lineage and the evaluation as tags, and the content hash of the adapter
(`adapter_sha256`), so registering the same outputs twice finds the existing version instead of adding one.
New versions get the alias `challenger`; only the promote stage gives out `champion` (see promote.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import EvalReport, RegisteredVersion, Registration, TrainReport, ValidationReport
from medlora.core.io import directory_hash
from medlora.core.tracking import dvc_lock_md5, lineage_tags, resume_pipeline_run, tracking_uri
from medlora.registry.client import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    current_champion,
    find_version,
    open_registry,
    set_alias,
)
from medlora.registry.gates import Verdict, candidate_from_gate, should_promote

logger = logging.getLogger(__name__)


def pip_requirements() -> list[str]:
    """Pinned requirements of a registered model (explicit: MLflow's inference adds torchvision, FINDINGS).

    medlora itself comes first: the adapter's models-from-code file runs without it, but a version is only known
    to behave as tested next to the medlora that registered it (and medlora code that loads it uses its types).
    Local version suffixes (torch's `+cpu`) are dropped: PyPI has no such file.
    """
    from importlib.metadata import version

    packages = ("medlora", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def version_tags(
    params: Params, train: TrainReport, validation: ValidationReport, evaluation: EvalReport, adapter_sha256: str
) -> dict[str, str]:
    """Tags both versions of one pipeline run carry: lineage, DVC hashes, evaluation and verdicts."""
    return {
        **lineage_tags(params),
        "adapter_dvc_md5": dvc_lock_md5("train", params.paths.adapter_dir),
        "merged_dvc_md5": dvc_lock_md5("merge", params.paths.merged_dir),
        "adapter_sha256": adapter_sha256,
        "mlflow_run_id": train.require_run_id(params.paths.reports_dir),
        **evaluation.gate.tags(),
        **validation.tags(),
        **train.tags(),
    }


def registration_verdict(
    client: Any, params: Params, train: TrainReport, validation: ValidationReport, evaluation: EvalReport
) -> Verdict:
    """The gates against the current champion, as the promote stage will run them."""
    candidate, base = candidate_from_gate(evaluation.gate, validation.success, train.coverage_passed)
    return should_promote(candidate, base, current_champion(client, params.register.adapter_name), params.promote)


def register_one(
    client: Any, params: Params, kind: str, identity: dict[str, str], tags: dict[str, str]
) -> RegisteredVersion:
    """Find the version of this kind with these identity tags, or log the model to the pipeline run and register it.

    Returns the version (created or found). A reused version gets its tags refreshed (a re-evaluation of
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
        return RegisteredVersion(name, str(existing.version), False, existing.run_id)
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
    return RegisteredVersion(name, str(version.version), True, version.run_id)


def mark_challenger(client: Any, entry: RegisteredVersion) -> None:
    """`challenger` on a candidate version, unless it already is the champion."""
    if alias_version(client, entry.name, CHAMPION) != entry.version:
        set_alias(client, entry.name, CHALLENGER, entry.version)


def run(params: Params) -> Registration:
    """The `register` stage: register adapter (and merged) versions of this pipeline run; returns the report."""
    reports = params.paths.reports_dir
    train, evaluation = TrainReport.read(reports), EvalReport.read(reports)
    validation = ValidationReport.read(reports)
    run_id = train.require_run_id(reports)
    client = open_registry(params)
    adapter_sha256 = directory_hash(params.paths.adapter_dir)
    tags = version_tags(params, train, validation, evaluation, adapter_sha256)
    adapter = register_one(client, params, "adapter", {"adapter_sha256": adapter_sha256}, tags)
    mark_challenger(client, adapter)
    verdict = registration_verdict(client, params, train, validation, evaluation)
    merged, skipped = None, None
    if params.register.register_merged == "always" or verdict.promote:
        identity = {"adapter_sha256": adapter_sha256, "merged_sha256": directory_hash(params.paths.merged_dir)}
        merged = register_one(client, params, "merged", identity, tags)
        mark_challenger(client, merged)
        client.set_model_version_tag(adapter.name, adapter.version, "merged_version", merged.version)
        client.set_model_version_tag(merged.name, merged.version, "adapter_version", adapter.version)
    else:
        skipped = "register.register_merged is if_promotable and the gates fail: " + "; ".join(verdict.failed)
        logger.info("merged model not registered: %s", skipped)
    return Registration(
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri(params.paths.mlruns_dir),
        adapter=adapter,
        merged=merged,
        merged_skipped=skipped,
        gates_at_registration=verdict.reasons,
        tags=tags,
    )
