"""dvc.yaml's code deps are each stage's import closure, and the train fingerprint hashes the same files.

Edit a module and DVC must rerun the stages that import it; a hand-kept list went stale before (train listed 5 of the
17 modules it imports), so the list is checked against the source here.
"""

from __future__ import annotations

import yaml

from conftest import PROJECT_ROOT
from medlora.core.imports import PACKAGE_DIR, code_dependencies, import_closure, stage_code_files

STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
# lm-eval imports the task hooks by path (TaskManager include_path), not through a medlora import.
EXTRA_ROOTS = {"evaluate": [PACKAGE_DIR / "evaluation" / "lm_eval_tasks" / "utils.py"]}


def declared_code_deps(stage: str) -> list[str]:
    return sorted(dep for dep in STAGES[stage]["deps"] if dep.startswith("src/"))


def test_every_stage_lists_exactly_the_code_it_imports():
    for stage, spec in STAGES.items():
        entry = PROJECT_ROOT / "pipelines" / f"{stage}.py"
        assert f"pipelines/{stage}.py" in spec["deps"], stage
        needed = set(code_dependencies(entry))
        for root in EXTRA_ROOTS.get(stage, []):
            needed |= set(code_dependencies(root))
        assert declared_code_deps(stage) == sorted(needed), f"dvc.yaml stage {stage}: code deps differ"


def test_closure_follows_lazy_imports_and_parents(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("def later():\n    from medlora.registry.gates import should_promote\n")
    closure = import_closure(script)
    # A function-level import counts, and so do the packages it runs first and what gates imports.
    assert {"medlora", "medlora.registry", "medlora.registry.gates", "medlora.core.contracts"} <= closure
    assert "medlora.training.train" not in closure
    assert code_dependencies(script) == ["src/medlora/core", "src/medlora/registry"]


def test_promote_needs_no_model_code():
    """The layering pays off in DVC: editing a model module must not rerun the promote stage."""
    assert declared_code_deps("promote") == ["src/medlora/core", "src/medlora/registry"]


def test_train_fingerprint_hashes_the_files_dvc_lists_for_train():
    files = stage_code_files("medlora.training.train")
    listed = {PROJECT_ROOT / dep for dep in declared_code_deps("train")}
    assert files and all(any(directory in f.parents for directory in listed) for f in files)
    on_disk = {p for d in listed for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert set(files) == on_disk


def test_import_contracts_hold():
    """The layer contract in pyproject.toml (`make lint` runs the same check)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([lint], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-2000:]
