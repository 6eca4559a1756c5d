"""The stage contracts: reports round-trip their files, a missing file or key names the stage to run."""

from __future__ import annotations

import json

import pytest

from conftest import write_train_report
from medlora.core.contracts import (
    GATE_TAG_KEYS,
    ContractError,
    EvalGate,
    MergeReport,
    RegisteredVersion,
    Registration,
    TrainReport,
)

GATE = EvalGate("task/acc", 0.25, 0.5, 0.49, 0.25, 1e-3, "mcnemar_exact", 300, 0.01)


def test_train_report_round_trips_and_reads_its_verdict(tmp_path):
    write_train_report(tmp_path, "run-1", coverage_passed=False)
    report = TrainReport.read(tmp_path)
    assert report.mlflow_run_id == "run-1" and report.coverage_passed is False
    assert report.tags() == {"coverage_passed": "False"}
    assert TrainReport.from_dict(json.loads((tmp_path / "train.json").read_text())) == report


def test_missing_file_and_missing_key_name_the_stage(tmp_path):
    with pytest.raises(ContractError, match=r"train\.json is missing: run the train stage first"):
        TrainReport.read(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"backend": "hf"}))
    with pytest.raises(ContractError, match=r"train\.json has no 'batching': rerun the train stage"):
        TrainReport.read(tmp_path)
    write_train_report(tmp_path, None)
    with pytest.raises(ContractError, match="has no mlflow_run_id"):
        TrainReport.read(tmp_path).require_run_id(tmp_path)


def test_gate_tags_are_strings_and_come_back():
    tags = GATE.tags()
    assert set(tags) == {f"gate.{key}" for key in GATE_TAG_KEYS} and all(isinstance(v, str) for v in tags.values())
    back = EvalGate.from_tags(tags)
    assert (back.metric, back.base, back.adapter, back.merged, back.p_value) == ("task/acc", 0.25, 0.5, 0.49, 1e-3)
    with pytest.raises(ContractError, match=r"gate\.metric"):
        EvalGate.from_tags({"gate.base": "1"})


def test_nested_contracts_are_rebuilt_on_read(tmp_path):
    adapter = RegisteredVersion("medlora-adapter", "3", True, "run")
    Registration("run", "sqlite:///x", adapter, None, "gates fail", ["PASS a"], {"k": "v"}).write(tmp_path)
    read = Registration.read(tmp_path)
    assert read.adapter == adapter and read.merged is None


def test_merge_report_writes_error_only_on_failure(tmp_path):
    passed = MergeReport(1e-6, 1e-6, 1e-4, 8, 100, True)
    assert "error" not in passed.to_dict()
    failed = MergeReport(1.0, 1.0, 1e-4, 8, 100, False, error="too far")
    failed.write(tmp_path)
    assert MergeReport.read(tmp_path).error == "too far"
