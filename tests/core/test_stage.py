"""run_stage: every stage script writes its report the same way, on success and on a deliberate stop."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import PROJECT_ROOT
from medlora.core.config import Params
from medlora.core.contracts import MergeReport, StageFailed
from medlora.core.stage import run_stage

REPORT = MergeReport(1e-6, 1e-6, 1e-4, 8, 100, True)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(Params().to_dict()))
    return tmp_path


def test_success_writes_the_returned_report(project):
    assert run_stage(lambda params: REPORT) == REPORT
    assert MergeReport.read(project / "reports") == REPORT


def test_a_deliberate_stop_still_writes_its_report_and_exits_1(project):
    def failing(params):
        raise StageFailed("parity failed", REPORT.__class__(1.0, 1.0, 1e-4, 8, 100, False, error="parity failed"))

    with pytest.raises(SystemExit) as stopped:
        run_stage(failing)
    assert stopped.value.code == 1
    assert MergeReport.read(project / "reports").error == "parity failed"


def test_a_params_typo_exits_2_naming_the_key_without_a_traceback(project):
    raw = Params().to_dict()
    raw["train"]["learning_rat"] = 1e-4
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pipelines" / "validate.py")], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "params.yaml: train: unknown key 'learning_rat'" in result.stderr
    assert "Traceback" not in result.stderr and not (project / "reports").exists()
