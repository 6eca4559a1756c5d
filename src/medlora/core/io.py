"""Files the stages share: crash-safe writers, the one JSON-lines reader, the one set of hashers."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix, so writers that go by it still work); on success it replaces
    `path` in one rename, so a crash never leaves a half-written file where a rerun would read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    yield tmp
    tmp.replace(path)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside `target`; on success it replaces `target` in one rename.

    A crash inside the block leaves `target` as it was (or absent) and only a `.partial` directory that the
    next call removes first.
    """
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        partial.rename(target)
        shutil.rmtree(old)
    else:
        partial.rename(target)


class JsonlError(ValueError):
    """A JSON-lines file that cannot be read; the message names the file, the 1-based line and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def read_jsonl(
    path: str | Path, required: tuple[str, ...] = (), error: type[JsonlError] = JsonlError, allow_empty: bool = False
) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file, each a mapping holding at least the `required` keys; blank lines skipped.

    The one JSONL reader of the project. Raises `error` (file, line, problem) for an empty file (unless
    `allow_empty`), bytes that are not UTF-8, a line that is not a JSON object, or a row missing a required key.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        if allow_empty:
            return []
        raise error(path, None, "file is empty")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as problem:
            raise error(path, number, f"bytes that are not UTF-8 at column {problem.start + 1}") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as problem:
            raise error(path, number, f"not valid JSON ({problem.msg} at column {problem.colno})") from None
        if not isinstance(row, dict):
            raise error(path, number, f"expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise error(path, number, f"missing column(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    """sha256 of one file, streamed."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_hash(files: list[Path], root: str | Path | None = None) -> str:
    """sha256 over the names (relative to `root` when given) and bytes of `files`, in the order given."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root) if root is not None else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def directory_hash(path: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over the relative names and bytes of a directory's files (but those named in `exclude`): identifies a
    local base model, adapter or merged model exactly."""
    root = Path(path)
    return files_hash(sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude), root)
