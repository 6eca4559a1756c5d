"""DVC reruns what an edit touches: the committed dvc.lock matches the committed code, and editing a module marks
exactly the stages that import it (checked with `dvc status` on a copy of the tracked project)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from medlora.core.imports import import_closure
from medlora.gpu_check import copy_tracked_files

STAGES = ("params", "validate", "model", "format", "train", "merge", "evaluate", "register", "promote")
EDITED = {
    "src/medlora/data/validation.py": "medlora.data.validation",
    "src/medlora/evaluation/significance.py": "medlora.evaluation.significance",
    "src/medlora/registry/gates.py": "medlora.registry.gates",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tracked files only, as a fresh clone has them (no data, no outputs)."""
    root = copy_tracked_files(PROJECT_ROOT, tmp_path_factory.mktemp("deps") / "medlora", leave_out=())
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def stages_with_changed_code(project: Path) -> set[str]:
    """Stages whose pipelines/ or src/ deps differ from what dvc.lock records (missing data and outputs ignored)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout.strip().splitlines()[-1] or "{}")
    changed = set()
    for stage, entries in status.items():
        for entry in entries:
            deps = entry.get("changed deps", {}) if isinstance(entry, dict) else {}
            if any(path.startswith(("src/", "pipelines/")) for path in deps):
                changed.add(stage)
    return changed


def importers(module: str) -> set[str]:
    return {stage for stage in STAGES if module in import_closure(PROJECT_ROOT / "pipelines" / f"{stage}.py")}


def test_committed_lock_matches_committed_code(project):
    assert stages_with_changed_code(project) == set()


@pytest.mark.parametrize("path", sorted(EDITED))
def test_editing_a_module_reruns_exactly_the_stages_that_import_it(project, path):
    source = project / path
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# an edit\n")
        changed = stages_with_changed_code(project)
    finally:
        source.write_bytes(original)
    assert changed == importers(EDITED[path]) and changed, path
