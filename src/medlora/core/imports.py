"""Which library code a stage runs: its import closure, read from the source (nothing is imported).

`dvc.yaml` names, for every stage, the subpackage directories its entry script reaches through `medlora` imports
(tests/core/test_imports.py fails when one is missing or extra), and the train stage's checkpoint fingerprint
hashes the files of the same directories (`stage_code_files`). So DVC and resume agree on what "the code changed"
means, and neither can go stale when a module gains an import.

Every `import medlora.x` / `from medlora.x import y` counts, at module level or inside a function: a lazy import
runs as surely as an eager one, just later.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "medlora"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/medlora


def module_path(module: str) -> Path | None:
    """The source file of a `medlora...` module (a package's `__init__.py`), or None when there is none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(source: Path) -> set[str]:
    """`medlora` modules a source file imports (`from medlora.a import b` yields medlora.a, and medlora.a.b when
    b is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != PACKAGE:
                continue
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if module_path(f"{node.module}.{a.name}"))
    return found


def import_closure(entry: str | Path) -> set[str]:
    """Every `medlora` module reachable from `entry` (a module name or a script path), parents included."""
    start = Path(entry) if isinstance(entry, Path) or str(entry).endswith(".py") else module_path(str(entry))
    if start is None or not start.is_file():
        raise FileNotFoundError(f"no source for {entry}")
    seen: set[str] = set()
    pending = list(imported_modules(start))
    if not isinstance(entry, Path) and not str(entry).endswith(".py"):
        pending.append(str(entry))
    while pending:
        module = pending.pop()
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = ".".join(parts[:depth])
            path = module_path(parent)
            if parent in seen or path is None:
                continue
            seen.add(parent)
            pending.extend(imported_modules(path))
    return seen


def code_dependencies(entry: str | Path) -> list[str]:
    """The DVC deps for `entry`'s library code: `src/medlora/<subpackage>` for each subpackage in its closure,
    `src/medlora/<module>.py` for top-level modules (the root `__init__` only holds the version)."""
    deps = set()
    for module in import_closure(entry):
        parts = module.split(".")
        if len(parts) == 1:
            continue
        if (PACKAGE_DIR / parts[1]).is_dir():
            deps.add(f"src/{PACKAGE}/{parts[1]}")
        else:
            deps.add(f"src/{PACKAGE}/{parts[1]}.py")
    return sorted(deps)


def stage_code_files(entry: str | Path) -> list[Path]:
    """Every file under `code_dependencies(entry)`, sorted: what a fingerprint of "this stage's code" hashes."""
    files: list[Path] = []
    for dep in code_dependencies(entry):
        path = PACKAGE_DIR / dep.removeprefix(f"src/{PACKAGE}/")  # also right for an installed (non-editable) copy
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files.extend(p for p in found if "__pycache__" not in p.parts)
    return sorted(files)
