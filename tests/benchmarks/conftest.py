"""Smoke runs of benchmarks/*.py: each benchmark runs as a subprocess at a tiny size, its last stdout line parsed.

A benchmark nobody runs rots unseen (a renamed library call only fails at its full-size run); these tests run each
one the way a person would, with every output in pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = PROJECT_ROOT / "benchmarks"


@pytest.fixture
def run_benchmark(tmp_path: Path) -> Callable[..., tuple[dict[str, Any], list[str]]]:
    """`run_benchmark("data_throughput", "--smoke", ...)` -> (the last stdout line as JSON, the lines before it).

    Fails with the end of stderr when the benchmark exits non-zero, and when stdout does not end with a JSON object
    preceded by human-readable figures.
    """

    def run(name: str, *args: str, timeout: float = 180) -> tuple[dict[str, Any], list[str]]:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"),  # lm-eval's dataset loads stay in tmp_path
        }
        env.pop("MLFLOW_TRACKING_URI", None)  # a store set by another test must not receive the benchmark's runs
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{name} exited {result.returncode}; stderr ends:\n{result.stderr[-4000:]}"
        lines = result.stdout.strip().splitlines()
        assert lines, f"{name} printed nothing on stdout; stderr ends:\n{result.stderr[-2000:]}"
        figures = json.loads(lines[-1])
        assert isinstance(figures, dict), f"{name}: the last stdout line is not a JSON object: {lines[-1][:200]}"
        assert lines[:-1], f"{name}: no human-readable figures before the JSON line"
        return figures, lines[:-1]

    return run
