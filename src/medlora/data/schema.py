"""Strict reading of snapshot files: one JSON-lines file per split in MedMCQA's hub schema.

The schema itself (`COLUMNS`, `LETTERS`, ...) lives in `medlora.core.contracts`, since every stage reads rows.
Reading is strict about what makes a file unusable (bytes that are not UTF-8, a line that is not JSON, a missing
column, an empty file): those stop with `SnapshotParseError` naming the file, the line and the problem. Row-level
quality (an empty option, a `cop` out of range) is the validate stage's business, not the reader's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlora.core.contracts import COLUMNS
from medlora.core.io import JsonlError, read_jsonl


class SnapshotParseError(JsonlError):
    """A snapshot file that cannot be read at all; the message names file, line and problem."""


def split_path(data_dir: str | Path, split: str) -> Path:
    """Where a split lives inside a snapshot directory."""
    return Path(data_dir) / f"{split}.jsonl"


def read_jsonl_rows(path: str | Path, required: tuple[str, ...] = COLUMNS) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each with at least the `required` columns (see `core.io.read_jsonl`).

    Raises SnapshotParseError (file, 1-based line, problem).
    """
    return read_jsonl(path, required, error=SnapshotParseError)


def read_split(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a snapshot, strictly parsed (see `read_jsonl_rows`)."""
    return read_jsonl_rows(split_path(data_dir, split))
