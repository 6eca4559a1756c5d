"""The MedMCQA hub schema and strict reading of snapshot files.

A snapshot is one JSON-lines file per split in the hub schema. Reading is strict about what makes a file
unusable (bytes that are not UTF-8, a line that is not JSON, a missing column, an empty file): those stop
with `SnapshotParseError` naming the file, the line and the problem. Row-level quality (an empty option, a
`cop` out of range) is the validate stage's business, not the reader's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS: tuple[str, ...] = (
    "id",
    "question",
    "opa",
    "opb",
    "opc",
    "opd",
    "cop",
    "choice_type",
    "exp",
    "subject_name",
    "topic_name",
)
OPTION_COLUMNS: tuple[str, ...] = ("opa", "opb", "opc", "opd")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CHOICE_TYPES: tuple[str, ...] = ("single", "multi")
UNLABELED_COP = -1


class SnapshotParseError(ValueError):
    """A snapshot file that cannot be read at all; the message names file, line and problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def split_path(data_dir: str | Path, split: str) -> Path:
    """Where a split lives inside a snapshot directory."""
    return Path(data_dir) / f"{split}.jsonl"


def read_jsonl_rows(path: str | Path, required: tuple[str, ...] = COLUMNS) -> list[dict[str, Any]]:
    """Read a JSON-lines file of rows, each a mapping with at least the `required` keys.

    Raises SnapshotParseError (file, 1-based line, problem) for an empty file, non-UTF-8 bytes, a line that
    is not a JSON object, or a row missing a required column. Blank lines are skipped.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise SnapshotParseError(path, None, "file is empty")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SnapshotParseError(path, number, f"bytes that are not UTF-8 at column {error.start + 1}") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise SnapshotParseError(path, number, f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise SnapshotParseError(path, number, f"expected a JSON object, got {type(row).__name__}")
        missing = [column for column in required if column not in row]
        if missing:
            raise SnapshotParseError(path, number, f"missing column(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def read_split(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a snapshot, strictly parsed (see `read_jsonl_rows`)."""
    return read_jsonl_rows(split_path(data_dir, split))


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows atomically, so a crash never leaves a half-written file behind."""
    from medlora.core.io import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
