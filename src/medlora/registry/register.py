"""The `register` stage's verb: this pipeline run's adapter and merged model into the MLflow registry.

Each pipeline run registers two versions, linked to the pipeline's MLflow run (`mlflow_run_id` in
`reports/train.json`): the adapter (`register.adapter_name`, a pyfunc that ships its base reference, see
adapter_model) and the merged model (`register.merged_name`, a pyfunc that answers MedMCQA rows with the training
prompt, servable with `mlflow models serve`, see merged_model). New versions get the alias `challenger`; only the
promote stage gives out `champion` (see promote.py).

A version is defined by what produced it, not by its bytes (retraining with the same params and data gives other
bytes): the train stage's `params_hash` and `inputs_hash` (formatted data, base reference, training code), for
the adapter and the merged model alike. A run with the same definition reuses the existing version, refreshing
only its evaluation tags (gates, evaluation data, verdicts); its weights, lineage and artifacts stay those of the
run that created it. The content hash of this run's adapter is still recorded (`adapter_sha256`).

Before anything is registered, what a killed register stage left (half-registered versions, PENDING logged models,
RUNNING runs) is marked (recovery.py), and never reused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import EvalReport, RegisteredVersion, Registration, TrainReport, ValidationReport
from medlora.core.io import directory_hash, sha256_file
from medlora.core.tracking import (
    EXPERIMENT_NAME,
    dvc_lock_md5,
    lineage_tags,
    owner_stamp,
    resume_pipeline_run,
    tracking_uri,
)
from medlora.registry.client import (
    CHALLENGER,
    CHAMPION,
    OWNER_TAG,
    alias_version,
    current_champion,
    find_version,
    open_registry,
    set_alias,
)
from medlora.registry.gates import EvalSet, Verdict, candidate_from_gate, should_promote
from medlora.registry.recovery import mark_leftovers

logger = logging.getLogger(__name__)

# Tags refreshed on a reused version: what this run's evaluation and checks said. Every other tag describes the
# weights and artifacts of the run that created the version and is never overwritten.
EVALUATION_TAG_PREFIXES = ("gate.", "eval.")
VERDICT_TAGS = ("validation_success", "coverage_passed")
REUSED_BY_TAG = "reused_by_run_id"


def pip_requirements() -> list[str]:
    """Pinned requirements of a registered model (explicit: MLflow's inference adds torchvision, FINDINGS).

    medlora itself comes first: the models-from-code files run without it, but a version is only known
    to behave as tested next to the medlora that registered it (and medlora code that loads it uses its types).
    Local version suffixes (torch's `+cpu`) are dropped: PyPI has no such file.
    """
    from importlib.metadata import version

    packages = ("medlora", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def adapter_definition(train: TrainReport) -> dict[str, str]:
    """What defines an adapter version: the train stage's params and inputs (data, base reference, code) hashes.

    As tags they replace the lineage's `params_hash` (the params at registration: the same value, as train and
    register of one pipeline run read one params.yaml) and add `inputs_hash`.
    """
    return {"params_hash": train.params_hash, "inputs_hash": train.inputs_hash}


def merged_definition(train: TrainReport) -> dict[str, str]:
    """What defines a merged version: its adapter's definition. The merged weights are the adapter folded into the
    base in the base's dtype (`model.torch_dtype`, a param the train hash covers); the `merge` params are only
    parity thresholds."""
    return adapter_definition(train)


def evaluation_set(params: Params, evaluation: EvalReport) -> EvalSet:
    """What the evaluation measured on: its validation file's sha256 (recorded by evaluate, else hashed here),
    the question limit and the source. The champion gates compare like with like only (gates.py)."""
    sha = evaluation.validation_sha256
    if sha is None:
        path = Path(evaluation.validation_file)
        if path.is_file():
            sha = sha256_file(path)
        else:
            logger.warning("%s (the evaluation's validation file) is missing: its data cannot be compared", path)
    return EvalSet(validation_sha256=sha, limit=evaluation.limit, source=evaluation.source)


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
        **evaluation_set(params, evaluation).tags(),
        "eval.tasks": ",".join(evaluation.tasks),
        **validation.tags(),
        **train.tags(),
    }


def evaluation_tags(tags: dict[str, str]) -> dict[str, str]:
    """The part of `tags` a reused version gets refreshed: this run's evaluation and verdicts."""
    return {key: value for key, value in tags.items() if key.startswith(EVALUATION_TAG_PREFIXES) or key in VERDICT_TAGS}


def registration_verdict(
    client: Any, params: Params, train: TrainReport, validation: ValidationReport, evaluation: EvalReport
) -> Verdict:
    """The gates against the current champion, as the promote stage will run them."""
    candidate, base = candidate_from_gate(
        evaluation.gate, validation.success, train.coverage_passed, evaluated_on=evaluation_set(params, evaluation)
    )
    return should_promote(candidate, base, current_champion(client, params.register.adapter_name), params.promote)


def register_one(
    client: Any, params: Params, kind: str, identity: dict[str, str], tags: dict[str, str], owner: str
) -> RegisteredVersion:
    """Find the usable version of this kind with this definition (`identity` tags), or log the model to the
    pipeline run and register it.

    Returns the version (created or found). A reused version gets its evaluation tags refreshed and
    `reused_by_run_id`; the run that asked gets a `registered.<kind>` tag naming it either way.
    """
    import mlflow

    from medlora.registry.adapter_model import log_adapter_model
    from medlora.registry.merged_model import log_merged_model

    name = params.register.adapter_name if kind == "adapter" else params.register.merged_name
    run_id = tags["mlflow_run_id"]
    existing = find_version(client, name, identity)
    if existing is not None:
        for key, value in {**evaluation_tags(tags), REUSED_BY_TAG: run_id}.items():
            client.set_model_version_tag(name, existing.version, key, value)
        client.set_tag(run_id, f"registered.{kind}", f"{name}/{existing.version} (reused)")
        same_bytes = existing.tags.get("adapter_sha256") == tags["adapter_sha256"]
        logger.info(
            "%s: version %s has the same definition (%s), reusing it%s",
            name,
            existing.version,
            ", ".join(f"{key} {value}" for key, value in identity.items()),
            "" if same_bytes else f"; its weights are those of run {existing.run_id}, not this run's retraining",
        )
        return RegisteredVersion(name, str(existing.version), False, existing.run_id)
    stamp = {OWNER_TAG: owner}
    with resume_pipeline_run(params, run_id):
        mlflow.set_tag(OWNER_TAG, owner)  # a RUNNING run carrying it after we are gone was left by a kill
        if kind == "adapter":
            info = log_adapter_model(
                params.paths.adapter_dir, params.paths.base_model_dir, pip_requirements(), tags=stamp
            )
        else:
            info = log_merged_model(
                params.paths.merged_dir, params.format.system_prompt, pip_requirements(), tags=stamp
            )
        version = mlflow.register_model(info.model_uri, name, tags={**tags, **identity, **stamp, "kind": kind})
        mlflow.set_tag(f"registered.{kind}", f"{name}/{version.version}")
        client.delete_tag(run_id, OWNER_TAG)
    logger.info("%s: registered version %s from run %s", name, version.version, run_id)
    return RegisteredVersion(name, str(version.version), True, version.run_id)


def mark_challenger(client: Any, entry: RegisteredVersion) -> None:
    """`challenger` on a candidate version, unless it already is the champion."""
    if alias_version(client, entry.name, CHAMPION) != entry.version:
        set_alias(client, entry.name, CHALLENGER, entry.version)


def run(params: Params) -> Registration:
    """The `register` stage: register adapter (and merged) versions of this pipeline run; returns the report."""
    import mlflow

    reports = params.paths.reports_dir
    train, evaluation = TrainReport.read(reports), EvalReport.read(reports)
    validation = ValidationReport.read(reports)
    run_id = train.require_run_id(reports)
    client = open_registry(params)
    owner = owner_stamp()
    names = (params.register.adapter_name, params.register.merged_name)
    leftovers = mark_leftovers(client, mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id, names, owner)
    adapter_sha256 = directory_hash(params.paths.adapter_dir)
    tags = version_tags(params, train, validation, evaluation, adapter_sha256)
    adapter = register_one(client, params, "adapter", adapter_definition(train), tags, owner)
    mark_challenger(client, adapter)
    verdict = registration_verdict(client, params, train, validation, evaluation)
    merged, skipped = None, None
    if params.register.register_merged == "always" or verdict.promote:
        if (
            not adapter.created
            and client.get_model_version(adapter.name, adapter.version).tags.get("adapter_sha256") != adapter_sha256
        ):
            logger.warning(
                "%s v%s was reused (same definition) but this run's adapter bytes differ: a merged version created "
                "now would hold this run's weights, not v%s's",
                adapter.name, adapter.version, adapter.version,
            )  # fmt: skip
        merged = register_one(client, params, "merged", merged_definition(train), tags, owner)
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
        leftovers_marked=leftovers,
    )
