"""Registry and promotion against a throwaway SQLite store: reload parity, idempotency, champion/challenger,
rollback, forced promotion, failures halfway through an alias move, an unreachable store, a missing base."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import socket
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_train_report
from medlora.core.config import Params, PathsConfig, PromoteConfig, RegisterConfig
from medlora.core.contracts import (
    EvalGate,
    EvalReport,
    PromotionReport,
    RegisteredVersion,
    Registration,
    TrainReport,
    ValidationReport,
)
from medlora.core.io import read_json, write_json
from medlora.modeling.base_model import BASE_REFERENCE_FILE, BaseModelUnavailable, load_base_model

METRIC = "medmcqa_chat_loglik/answer_loglik"
ADAPTER, MERGED = "medlora-adapter", "medlora-merged"


def gate(adapter: float, base: float = -8.0, p_value: float = 1e-6) -> dict:
    return {
        "metric": METRIC,
        "base": base,
        "adapter": adapter,
        "merged": adapter,
        "uplift": adapter - base,
        "p_value": p_value,
        "merged_vs_adapter": 0.0,
    }


def build_outputs(
    base_dir: Path, out: Path, seed: int, prompt: str = "Question: Which drug causes cinchonism?", new_tokens: int = 0
) -> dict:
    """A random-init LoRA adapter on the tiny base (saved as the train stage does) and its merged copy, with the
    in-memory adapter model's logits on `prompt` (and its greedy continuation of `new_tokens` tokens)."""
    from peft import LoraConfig, get_peft_model

    from medlora.registry.adapter_pyfunc import generate

    model, tokenizer = load_base_model(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "in_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    adapter_dir, merged_dir = out / "adapter", out / "merged"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    shutil.copy(base_dir / BASE_REFERENCE_FILE, adapter_dir / BASE_REFERENCE_FILE)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        adapter_logits = peft_model(ids).logits
    answer = generate(peft_model, tokenizer, [prompt], new_tokens)[0] if new_tokens else None
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    with torch.no_grad():
        merged_logits = merged(ids).logits
    return {"adapter": adapter_dir, "merged": merged_dir, "ids": ids, "adapter_logits": adapter_logits,
            "merged_logits": merged_logits, "answer": answer}  # fmt: skip


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_base_dir) -> list[dict]:
    """Three pipeline runs' worth of distinct adapters (built once for the module)."""
    root = tmp_path_factory.mktemp("runs")
    return [build_outputs(tiny_base_dir, root / f"run{seed}", seed) for seed in (1, 2, 3)]


def project_params(root: Path, base_dir: Path) -> Params:
    """Params whose paths all point into the temp project `root` (its own mlruns/ store) and the given base."""
    paths = PathsConfig(
        reports_dir=str(root / "reports"),
        base_model_dir=str(base_dir),
        adapter_dir=str(root / "outputs/adapter"),
        merged_dir=str(root / "outputs/merged"),
        mlruns_dir=str(root / "mlruns"),
    )
    return Params(paths=paths)


@pytest.fixture
def params(tmp_path, monkeypatch, tiny_base_dir) -> Params:
    """Params for a fresh temp project with its own SQLite store."""
    monkeypatch.chdir(tmp_path)
    return project_params(tmp_path, tiny_base_dir)


def pipeline_run(
    params: Params,
    run: dict,
    gate_values: dict,
    validation: bool = True,
    coverage=True,
    definition: str | None = None,
    validation_data: str = "synthetic validation split",
) -> str:
    """What train..evaluate leave behind: outputs, reports, and the pipeline's MLflow run. Returns its run id.

    `definition` stands for what the train stage hashes (params, data, code): runs built from different adapters
    differ in it unless a test says otherwise. `validation_data` is the content of the validation file evaluated.
    """
    import mlflow

    from medlora.core.tracking import start_pipeline_run

    for kind in ("adapter", "merged"):
        target = Path(getattr(params.paths, f"{kind}_dir"))
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run[kind], target)
    with start_pipeline_run(params) as active:
        run_id = active.info.run_id
    assert mlflow.active_run() is None
    definition = definition or str(run["adapter"].parent)
    write_reports(Path(params.paths.reports_dir), run_id, gate_values, validation, coverage, definition,
                  validation_data, params.params_hash())  # fmt: skip
    return run_id


def validation_file(reports: Path) -> Path:
    return reports.parent / "outputs" / "validated" / "validation.jsonl"


def write_reports(
    reports: Path,
    run_id: str,
    gate_values: dict,
    validation: bool,
    coverage: bool | None,
    definition: str = "run",
    validation_data: str = "synthetic validation split",
    params_hash: str = "params",
) -> None:
    """train.json, eval.json and validation.json as the stages write them, with the figures the gates read, and
    the validation file the evaluation scored. `definition` stands for the train stage's inputs (data, code)."""
    write_train_report(reports, run_id, coverage)
    inputs_hash = hashlib.sha256(definition.encode()).hexdigest()[:16]
    dataclasses.replace(TrainReport.read(reports), params_hash=params_hash, inputs_hash=inputs_hash).write(reports)
    validation_file(reports).parent.mkdir(parents=True, exist_ok=True)
    validation_file(reports).write_text(validation_data + "\n")
    EvalReport(
        gate=EvalGate.from_dict({"test": "wilcoxon_signed_rank", "n_paired": 8, **gate_values}),
        primary_metric=gate_values["metric"],
        results={},
        runs={},
        tasks=[gate_values["metric"].split("/")[0]],
        backend="hf",
        source="local",
        limit=None,
        batch_size=4,
        validation_file=str(validation_file(reports)),
        wall_seconds=1.0,
    ).write(reports)
    ValidationReport(
        success=validation, clean=validation, on_error="quarantine", rows_in=1, rows_kept=1, rows_quarantined=0,
        splits={}, rules={},
    ).write(reports)  # fmt: skip


def register_and_promote(params: Params) -> tuple[Registration, PromotionReport]:
    from medlora.registry.promote import run as promote_stage
    from medlora.registry.register import run as register

    registration = register(params)
    registration.write(params.paths.reports_dir)
    return registration, promote_stage(params)


def champions(params: Params) -> tuple[str | None, str | None]:
    from medlora.registry.client import CHAMPION, alias_version, open_registry

    client = open_registry(params)
    return alias_version(client, ADAPTER, CHAMPION), alias_version(client, MERGED, CHAMPION)


def aliases(client, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_registered_versions_reload_with_the_same_logits_and_carry_lineage(params, outputs):
    import mlflow

    from medlora.registry.client import open_registry
    from medlora.registry.register import run as register

    run_id = pipeline_run(params, outputs[0], gate(-5.0))
    registration = register(params)
    assert registration.adapter == RegisteredVersion(ADAPTER, "1", True, run_id)
    assert registration.merged == RegisteredVersion(MERGED, "1", True, run_id)

    adapter = mlflow.pyfunc.load_model(f"models:/{ADAPTER}/1")
    reloaded = adapter.unwrap_python_model()
    with torch.no_grad():
        adapter_logits = reloaded.model(outputs[0]["ids"]).logits
    assert max_diff(adapter_logits, outputs[0]["adapter_logits"]) < 1e-4
    # The trap FINDINGS warns about is a base that reloads with random weights: it would move logits by ~0.05.
    base_model, _ = load_base_model(params.paths.base_model_dir)
    assert max_diff(adapter_logits, base_model(outputs[0]["ids"]).logits) > 1e-3  # the adapter is really applied
    (answer,) = adapter.predict(["Question: Which drug causes cinchonism?"], params={"max_new_tokens": 3})
    assert isinstance(answer, str)

    merged = mlflow.pyfunc.load_model(f"models:/{MERGED}/1").unwrap_python_model()
    with torch.no_grad():
        merged_logits = merged.model(outputs[0]["ids"]).logits
    assert max_diff(merged_logits, outputs[0]["merged_logits"]) < 1e-4

    client = open_registry(params)
    for name in (ADAPTER, MERGED):
        version = client.get_model_version(name, "1")
        assert version.run_id == run_id
        for key in ("git_commit", "data_dvc_md5", "params_hash", "inputs_hash", "adapter_dvc_md5", "adapter_sha256"):
            assert version.tags[key]
        assert version.tags["params_hash"] == params.params_hash()
        assert version.tags["gate.adapter"] == "-5.0" and version.tags["gate.metric"] == METRIC
        assert (version.tags["validation_success"], version.tags["coverage_passed"]) == ("True", "True")
        assert aliases(client, name) == {"challenger": "1"}
    assert client.get_model_version(ADAPTER, "1").tags["merged_version"] == "1"


def test_registering_the_same_outputs_twice_adds_no_version(params, outputs):
    from medlora.registry.client import open_registry
    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0))
    first = register(params)
    second = register(params)
    assert (second.adapter.version, second.merged.version) == ("1", "1")
    assert second.adapter.created is False and second.merged.created is False
    client = open_registry(params)
    assert [len(client.search_model_versions(f"name='{n}'")) for n in (ADAPTER, MERGED)] == [1, 1]
    assert first.tags["adapter_sha256"] == second.tags["adapter_sha256"]


def test_champion_challenger_rejection_and_rollback(params, outputs):
    from medlora.registry.client import RegistryError, open_registry
    from medlora.registry.promote import rollback

    pipeline_run(params, outputs[0], gate(-5.0))
    _, first = register_and_promote(params)
    assert first.decision == "promoted"
    assert first.champion_before == {ADAPTER: None, MERGED: None}
    assert first.champion_after == {ADAPTER: "1", MERGED: "1"}

    pipeline_run(params, outputs[1], gate(-4.0))
    _, second = register_and_promote(params)
    assert second.decision == "promoted" and champions(params) == ("2", "2")
    client = open_registry(params)
    assert client.get_registered_model(ADAPTER).tags["previous_champion"] == "1"
    assert "challenger" not in aliases(client, ADAPTER)  # the challenger became champion

    pipeline_run(params, outputs[2], gate(-9.0))  # worse than the base: uplift -1
    _, third = register_and_promote(params)
    assert third.decision == "rejected"
    failed = [reason.split(":")[0] for reason in third.reasons if reason.startswith("FAIL")]
    assert failed == ["FAIL min_uplift", "FAIL champion_tolerance", "FAIL champion_margin"]
    assert champions(params) == ("2", "2")
    assert aliases(client, MERGED) == {"champion": "2", "challenger": "3"}
    assert read_json(Path(params.paths.reports_dir) / "registration.json")["adapter"]["version"] == "3"

    assert rollback(params) == {ADAPTER: "1", MERGED: "1"}
    assert champions(params) == ("1", "1")
    assert "previous_champion" not in client.get_registered_model(ADAPTER).tags
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(params)


def test_forced_promotion_records_who_and_why(params, outputs):
    from medlora.cli import promote_command
    from medlora.registry.client import open_registry
    from medlora.registry.promote import promote_version
    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0, p_value=0.3))
    register(params)
    args = SimpleNamespace(params="unused", version="1", force=True, reason=None)
    with pytest.raises(ValueError, match="--force needs --reason"):
        promote_command(params, args)
    assert promote_version(params, "1").decision == "rejected"
    report = promote_version(params, "1", force_reason="hotfix approved by the on-call")
    assert report.decision == "promoted" and report.forced is True
    tags = open_registry(params).get_model_version(MERGED, "1").tags
    assert tags["forced_reason"] == "hotfix approved by the on-call"
    assert tags["forced_failed_gates"].startswith("FAIL max_p_value: p-value 0.3")
    assert tags["forced_by"] and tags["forced_at"]
    assert champions(params) == ("1", "1")


def promote_two(params, outputs) -> None:
    """Champion v1 on both models, and a better v2 registered as challenger."""
    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0))
    register_and_promote(params)
    pipeline_run(params, outputs[1], gate(-4.0))
    register(params)


def fail_moving_merged_version_2(monkeypatch) -> None:
    """Make the store refuse the merged model's alias move to version 2 (after the adapter's move succeeded)."""
    from medlora.registry import promote as promotion

    real_set_alias = promotion.set_alias

    def failing_on_merged(client, name, alias, version):
        if name == MERGED and version == "2":
            raise ConnectionError("store went away")
        real_set_alias(client, name, alias, version)

    monkeypatch.setattr(promotion, "set_alias", failing_on_merged)


def test_failure_between_the_two_alias_moves_restores_both_champions(params, outputs, monkeypatch):
    from medlora.registry import promote as promotion
    from medlora.registry.client import RegistryError, open_registry

    promote_two(params, outputs)
    fail_moving_merged_version_2(monkeypatch)
    with pytest.raises(RegistryError, match=r"point medlora-merged@champion at version 2: store went away\. undid 3"):
        promotion.promote_version(params, "2")
    assert champions(params) == ("1", "1")  # the adapter's move was undone
    assert "previous_champion" not in open_registry(params).get_registered_model(ADAPTER).tags


def test_a_forced_promotion_that_fails_halfway_leaves_no_force_record(params, outputs, monkeypatch):
    from medlora.registry import promote as promotion
    from medlora.registry.client import RegistryError, open_registry
    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0))
    register_and_promote(params)
    pipeline_run(params, outputs[1], gate(-5.5))  # worse than the champion: only a force promotes it
    register(params)
    fail_moving_merged_version_2(monkeypatch)
    with pytest.raises(RegistryError, match="store went away"):
        promotion.promote_version(params, "2", force_reason="demo tomorrow")
    assert champions(params) == ("1", "1")
    for name in (ADAPTER, MERGED):
        assert not any(key.startswith("forced_") for key in open_registry(params).get_model_version(name, "2").tags)


def refuse_alias_writes(params: Params, name: str) -> None:
    """Put the real store in a bad state: a SQLite trigger refuses every alias write on model `name`."""
    database = sqlite3.connect(Path(params.paths.mlruns_dir) / "mlflow.db")
    for event in ("INSERT", "UPDATE"):
        database.execute(
            f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON registered_model_aliases "
            f"WHEN NEW.name = '{name}' AND NEW.alias = 'champion' BEGIN SELECT RAISE(ABORT, 'disk quota exceeded'); END"
        )
    database.commit()
    database.close()


def test_a_store_refusing_the_second_write_leaves_no_half_promotion(params, outputs):
    from medlora.registry.promote import promote_version

    promote_two(params, outputs)
    refuse_alias_writes(params, MERGED)
    with pytest.raises(RuntimeError, match=r"failed to point medlora-merged@champion at version 2.*disk quota"):
        promote_version(params, "2")
    assert champions(params) == ("1", "1")


def test_a_first_promotion_failing_halfway_leaves_no_champion_at_all(params, outputs):
    from medlora.registry.promote import run as promote_stage
    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0))
    register(params).write(params.paths.reports_dir)
    refuse_alias_writes(params, MERGED)
    with pytest.raises(RuntimeError, match="undid 1 earlier write"):
        promote_stage(params)
    assert champions(params) == (None, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_store_fails_with_a_clear_message_and_changes_nothing(params, outputs, monkeypatch):
    from medlora.registry.client import RegistryError
    from medlora.registry.promote import promote_version
    from medlora.registry.register import run as register

    promote_two(params, outputs)
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(RegistryError, match=f"tracking store {uri} is unreachable.*Nothing was changed"):
        promote_version(params, "2")
    with pytest.raises(RegistryError, match="unreachable"):
        register(params)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert champions(params) == ("1", "1")


def test_if_promotable_skips_the_merged_model_of_a_failing_candidate(params, outputs):
    from medlora.registry.client import RegistryError, open_registry
    from medlora.registry.promote import promote_version

    params = dataclasses.replace(params, register=RegisterConfig(register_merged="if_promotable"))
    pipeline_run(params, outputs[0], gate(-5.0), validation=False)
    registration, promotion = register_and_promote(params)
    assert registration.merged is None
    assert "FAIL validation: data validation failed" in registration.merged_skipped
    assert promotion.decision == "rejected"
    assert promotion.reasons[-1].startswith("FAIL merged_registered")
    assert open_registry(params).search_model_versions(f"name='{MERGED}'") == []
    with pytest.raises(RegistryError, match="no merged version"):
        promote_version(params, "1", force_reason="try anyway")


def test_status_table_lists_versions_aliases_and_metrics(params, outputs, capsys):
    from medlora.registry.client import format_table, open_registry, status_rows

    promote_two(params, outputs)
    rows = status_rows(open_registry(params), params)
    assert [(r["adapter"], r["aliases"], r["merged_aliases"]) for r in rows] == [
        ("2", "challenger", "challenger"),
        ("1", "champion", "champion"),
    ]
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["adapter", "merged", "aliases"]
    assert "-4" in table.splitlines()[1]


def test_adapter_whose_base_is_missing_fails_to_load_with_the_path(params, outputs, tmp_path):
    import mlflow

    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0))
    # A base referenced by path (like a hub preset pointed at a local directory), not shipped with the adapter.
    base_copy = tmp_path / "elsewhere" / "base_model"
    shutil.copytree(params.paths.base_model_dir, base_copy)
    reference_file = Path(params.paths.adapter_dir) / BASE_REFERENCE_FILE
    write_json(reference_file, {**read_json(reference_file), "name_or_path": str(base_copy)})
    register(params)
    assert mlflow.pyfunc.load_model(f"models:/{ADAPTER}/1").unwrap_python_model().model is not None
    shutil.rmtree(base_copy)
    with pytest.raises(BaseModelUnavailable, match=f"base model at {base_copy}, which does not exist"):
        mlflow.pyfunc.load_model(f"models:/{ADAPTER}/1")


def test_hub_base_offline_and_corrupt_shipped_base_fail_clearly(outputs, tiny_base_dir, tmp_path, monkeypatch):
    from medlora.registry.adapter_model import load_adapter, resolve_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tmp_path / "adapter"
    shutil.copytree(outputs[0]["adapter"], adapter)
    reference = read_json(adapter / BASE_REFERENCE_FILE)
    write_json(adapter / BASE_REFERENCE_FILE, {**reference, "name_or_path": "nvidia/no-such-model", "revision": "abc"})
    with pytest.raises(BaseModelUnavailable, match=r"nvidia/no-such-model@abc.*HF_HUB_OFFLINE"):
        load_adapter(adapter)
    with pytest.raises(BaseModelUnavailable, match="does not match the weights_sha256"):
        resolve_base({**reference, "weights_sha256": "0" * 64}, tiny_base_dir)
    with pytest.raises(BaseModelUnavailable, match="neither shipped with it nor named"):
        resolve_base(reference, None)


def test_promote_gates_come_from_params(params, outputs):
    from medlora.registry.promote import promote_version
    from medlora.registry.register import run as register

    params = dataclasses.replace(params, promote=PromoteConfig(min_value=-4.5))
    pipeline_run(params, outputs[0], gate(-5.0))
    register(params)
    report = promote_version(params, "1")
    assert report.decision == "rejected"
    assert "FAIL min_value: medmcqa_chat_loglik/answer_loglik -5 < -4.5" in report.reasons


def test_retraining_with_the_same_definition_reuses_the_version(params, outputs):
    """Same params, data and code give other adapter bytes: still the same version, with refreshed gate tags."""
    from medlora.registry.client import open_registry

    first_run = pipeline_run(params, outputs[0], gate(-5.0), definition="same params, data and code")
    first, _ = register_and_promote(params)
    second_run = pipeline_run(params, outputs[1], gate(-4.5), definition="same params, data and code")
    second, promotion = register_and_promote(params)
    assert (second.adapter, second.merged) == (
        RegisteredVersion(ADAPTER, "1", False, first_run),
        RegisteredVersion(MERGED, "1", False, first_run),
    )
    assert second.tags["adapter_sha256"] != first.tags["adapter_sha256"]  # the bytes did differ
    client = open_registry(params)
    assert [len(client.search_model_versions(f"name='{n}'")) for n in (ADAPTER, MERGED)] == [1, 1]
    for name in (ADAPTER, MERGED):
        tags = client.get_model_version(name, "1").tags
        assert tags["gate.adapter"] == "-4.5"  # the evaluation tags follow the latest evaluation
        assert tags["reused_by_run_id"] == second_run
        assert tags["adapter_sha256"] == first.tags["adapter_sha256"]  # the weights' tags stay the first run's
        assert tags["mlflow_run_id"] == first_run
    assert client.get_run(second_run).data.tags["registered.adapter"] == f"{ADAPTER}/1 (reused)"
    assert promotion.decision == "promoted" and champions(params) == ("1", "1")  # the champion itself

    pipeline_run(params, outputs[1], gate(-4.5), definition="one training data row changed")
    third, _ = register_and_promote(params)
    assert (third.adapter.version, third.adapter.created, third.merged.version) == ("2", True, "2")


def test_a_champion_scored_on_other_validation_data_is_not_compared(params, outputs):
    """A candidate scored on real MedMCQA against a champion scored on synthetic data: a person decides."""
    from medlora.core.io import sha256_file
    from medlora.registry.client import open_registry
    from medlora.registry.promote import promote_version

    pipeline_run(params, outputs[0], gate(-5.0), validation_data="synthetic validation split")
    register_and_promote(params)
    synthetic = sha256_file(Path(params.paths.reports_dir).parent / "outputs/validated/validation.jsonl")
    pipeline_run(params, outputs[1], gate(-1.0), validation_data="real MedMCQA validation split")
    registration, promotion = register_and_promote(params)
    assert promotion.decision == "rejected" and champions(params) == ("1", "1")
    failed = [reason for reason in promotion.reasons if reason.startswith("FAIL")]
    assert [reason.split(":")[0] for reason in failed] == ["FAIL champion_tolerance", "FAIL champion_margin"]
    assert f"vs champion's {synthetic[:12]}" in failed[0] and "--force" in failed[0]
    assert registration.gates_at_registration == promotion.reasons[: len(registration.gates_at_registration)]
    client = open_registry(params)
    assert client.get_model_version(ADAPTER, "1").tags["eval.validation_sha256"] == synthetic
    assert client.get_model_version(MERGED, "2").tags["eval.validation_sha256"] != synthetic
    assert client.get_model_version(ADAPTER, "2").tags["eval.tasks"] == "medmcqa_chat_loglik"
    forced = promote_version(params, "2", force_reason="real data replaces the synthetic champion")
    assert forced.decision == "promoted" and forced.forced and champions(params) == ("2", "2")


def test_the_evaluations_own_validation_hash_is_preferred_over_hashing_the_file(params, outputs):
    from medlora.registry.register import run as register

    pipeline_run(params, outputs[0], gate(-5.0))
    reports = Path(params.paths.reports_dir)
    evaluation = EvalReport.read(reports)
    dataclasses.replace(evaluation, validation_sha256="f" * 64).write(reports)
    Path(evaluation.validation_file).unlink()  # changed or gone since: the evaluation's record counts
    assert register(params).tags["eval.validation_sha256"] == "f" * 64


def dead_owner() -> str:
    """The owner stamp of a register process that was killed (a pid that existed and is gone)."""
    import subprocess
    import time

    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:{int(time.time()) - 60}"


def test_what_a_killed_register_stage_left_is_marked_and_never_reused(params, outputs):
    """A register stage killed mid-way left version 1 PENDING_REGISTRATION (challenger), a logged model PENDING and
    the pipeline run RUNNING. The next run marks all three (with the reason), registers a fresh version 2 and
    leaves alone what a live process is still writing."""
    import os
    import time

    from medlora.core.tracking import EXPERIMENT_NAME
    from medlora.registry.client import ABANDONED_TAG, OWNER_TAG, format_table, open_registry, status_rows
    from medlora.registry.promote import promote_version
    from medlora.registry.register import adapter_definition
    from medlora.registry.register import run as register

    run_id = pipeline_run(params, outputs[0], gate(-5.0))
    client = open_registry(params)
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
    killed, alive = dead_owner(), f"{socket.gethostname()}:{os.getppid()}:{int(time.time())}"
    definition = adapter_definition(TrainReport.read(params.paths.reports_dir))
    half = client.create_logged_model(experiment, name="adapter", source_run_id=run_id, tags={OWNER_TAG: killed})
    client.create_registered_model(ADAPTER)
    client.create_model_version(ADAPTER, f"models:/{half.model_id}", run_id=run_id,
                                tags={**definition, OWNER_TAG: killed})  # fmt: skip
    client.set_registered_model_alias(ADAPTER, "challenger", "1")
    database = sqlite3.connect(Path(params.paths.mlruns_dir) / "mlflow.db")
    database.execute("UPDATE model_versions SET status = 'PENDING_REGISTRATION' WHERE name = ?", (ADAPTER,))
    database.commit()
    database.close()
    writing = client.create_logged_model(experiment, name="merged", source_run_id=run_id, tags={OWNER_TAG: alive})
    client.set_tag(run_id, OWNER_TAG, killed)
    client.update_run(run_id, status="RUNNING")

    registration = register(params)
    assert (registration.adapter.version, registration.adapter.created) == ("2", True)  # v1 not reused
    assert len(registration.leftovers_marked) == 3, registration.leftovers_marked
    v1 = client.get_model_version(ADAPTER, "1")
    assert v1.tags[ABANDONED_TAG] == "true"
    assert v1.tags["medlora.abandoned_reason"].startswith(
        f"left PENDING_REGISTRATION (half registered): its process {killed} no longer runs; never reused"
    )
    assert aliases(client, ADAPTER) == {"challenger": "2"}
    assert client.get_logged_model(half.model_id).status.value == "FAILED"
    assert "no longer runs" in client.get_logged_model(half.model_id).tags["medlora.abandoned_reason"]
    assert client.get_logged_model(writing.model_id).status.value == "PENDING"  # its owner is alive: untouched
    run = client.get_run(run_id)
    assert "left RUNNING by a killed stage" in run.data.tags["medlora.killed_reason"]
    assert run.info.status == "FINISHED" and OWNER_TAG not in run.data.tags  # closed, then reopened and ended
    with pytest.raises(RuntimeError, match=r"medlora-adapter v1 is not fully registered \(left PENDING_REG"):
        promote_version(params, "1", force_reason="even by force")
    assert [row["state"] for row in status_rows(client, params)] == ["ready", "abandoned"]
    assert "abandoned" in format_table(status_rows(client, params))
    assert register(params).leftovers_marked == []  # marked once


def test_which_leftovers_count_as_abandoned():
    import os
    import time

    from medlora.core.tracking import owner_stamp
    from medlora.registry.recovery import STALE_AFTER_SECONDS, owner_gone

    now = time.time()
    young, old = now - 60, now - STALE_AFTER_SECONDS - 1
    assert "no longer runs" in owner_gone(dead_owner(), young, now)
    assert owner_gone(owner_stamp(), old, now) is None  # this very process
    assert owner_gone(f"{socket.gethostname()}:{os.getppid()}:{int(young)}", young, now) is None  # alive
    assert "pid was reused" in owner_gone(f"{socket.gethostname()}:{os.getppid()}:{int(old)}", old, now)
    assert owner_gone("elsewhere:123:0", young, now) is None  # another host: cannot check, too young to tell
    assert "cannot be checked" in owner_gone("elsewhere:123:0", old, now)
    assert owner_gone(None, young, now) is None
    assert "no owner recorded" in owner_gone(None, old, now)
