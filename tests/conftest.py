"""Shared fixtures: everything is built in-process, tiny, offline (no hub, no ../shared needed)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDMCQA = PROJECT_ROOT.parent / "shared" / "medmcqa"


def example_rows(n: int = 40) -> list[dict]:
    """MedMCQA-shaped rows for fixtures (hub schema), varied enough to train a tokenizer on."""
    drugs = ["Quinine", "Aspirin", "Digoxin", "Isoniazid", "Warfarin", "Lithium", "Metformin", "Atropine"]
    effects = [
        "cinchonism",
        "Reye syndrome",
        "xanthopsia",
        "neuropathy",
        "purple toe",
        "tremor",
        "lactic acidosis",
    ]
    rows = []
    for i in range(n):
        options = [drugs[(i + k) % len(drugs)] for k in range(4)]
        rows.append(
            {
                "id": f"fixture-{i:04d}",
                "question": f"Which drug causes {effects[i % len(effects)]}?",
                "opa": options[0],
                "opb": options[1],
                "opc": options[2],
                "opd": options[3],
                "cop": i % 4,
                "choice_type": "single",
                "exp": None if i % 3 == 0 else f"{options[i % 4]} is known to cause {effects[i % len(effects)]}.",
                "subject_name": ["Pharmacology", "Medicine"][i % 2],
                "topic_name": None,
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny NemotronH base model directory, built once per session through the `model` stage's verb."""
    from medlora.core.config import ModelConfig
    from medlora.modeling.base_model import build_base_model

    out = tmp_path_factory.mktemp("base") / "base_model"
    build_base_model(ModelConfig(), example_rows(200), out)
    return out


@pytest.fixture
def shared_medmcqa() -> Path:
    """../shared/medmcqa (real rows); skips when absent, as on a fresh clone elsewhere."""
    if not SHARED_MEDMCQA.is_dir():
        pytest.skip("../shared/medmcqa is not present")
    return SHARED_MEDMCQA


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; one test's store must not leak into the
    next test (or the stage subprocesses it starts). Tests that want a server set it themselves.

    Cleared after each test too: a module-scoped fixture is set up before the next test's own clean-up runs, and
    would otherwise log into the previous test's store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # not monkeypatch: its undo would put a leaked value back
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def wait_for_http_ok(
    url: str, process: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 120
) -> None:
    """Poll `url` until it answers 200; fail with `what` (and the log's tail) if `process` dies or time runs out."""
    tail = (lambda: "\n" + log.read_text()[-3000:]) if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f} s{tail()}")


def write_train_report(reports_dir: str | Path, run_id: str | None, coverage_passed: bool = True) -> None:
    """The reports/train.json a finished train stage leaves: what merge, evaluate and register read from it."""
    from medlora.core.contracts import TrainReport

    TrainReport(
        backend="hf",
        batching="length-grouped",
        trainable_params_by_block={"mamba": 1},
        trainable_params=1,
        total_params=2,
        coverage={"passed": coverage_passed},
        params_hash="test",
        inputs_hash="test",
        mlflow_run_id=run_id,
    ).write(reports_dir)


@pytest.fixture(scope="session")
def replica_dir(tmp_path_factory) -> Path:
    """An offline replica of the hub checkpoint (bf16 shards, `backbone.` names, no pad token, thinking template)."""
    from medlora.modeling.replica import build_replica

    return build_replica(tmp_path_factory.mktemp("replica") / "nemotron", "tiny")


@pytest.fixture(scope="session")
def replica_base_dir(replica_dir, tmp_path_factory) -> Path:
    """The `model` stage's output for the production preset pointed at the replica: tokenizer + reference only."""
    from medlora.core.config import ModelConfig
    from medlora.modeling.base_model import build_base_model

    out = tmp_path_factory.mktemp("replica_base") / "base_model"
    config = ModelConfig(preset="nemotron-3-nano-30b-a3b", name_or_path=str(replica_dir), torch_dtype="bfloat16")
    build_base_model(config, example_rows(40), out)
    return out


def stage_env(**extra: str) -> dict[str, str]:
    """The environment end-to-end tests run `dvc`/`medlora` in: this venv first on PATH, offline, quiet, one thread,
    a git identity, and no MLflow store or DVC experiment inherited from the caller."""
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
        "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com",
        **extra,
    }  # fmt: skip
    for variable in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(variable, None)
    return env
