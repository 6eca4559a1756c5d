"""`medlora snapshot` and `medlora restore`: the DVC-tracked MedMCQA snapshot under `data/medmcqa/`.

    medlora snapshot --source synthetic|hub|original [--path DIR] [--revision REV] [--no-dvc]
    medlora restore

A snapshot is `{train,validation,test}.jsonl` in the hub schema (key order `schema.COLUMNS`; `cop` 0-3, -1 where
unlabeled) plus `manifest.json` (source, revision, row counts, sha256 per file). `snapshot` writes it and runs
`dvc add` on the directory above it (`data`, so `data.dvc` sits at the project root and stage outputs never
overlap it). `restore` brings a fresh clone back to what `data.dvc` records without a DVC remote: the synthetic
source is deterministic and DVC's directory md5 depends only on file names and bytes, so regenerating it
reproduces the recorded md5 exactly, which `dvc status` then confirms.

Every source row becomes one snapshot row: a malformed value (a `cop` outside 1-4 in the original release, a
field missing from a hub row) is carried null or as read, so that the validate stage's suite quarantines the row
under its rule and counts it. Only a file that cannot be parsed at all stops the import (file and line named).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from medlora.core.config import Params, SnapshotConfig
from medlora.core.contracts import COLUMNS, SPLITS, UNLABELED_COP
from medlora.core.hub import HubUnavailable, ensure_hub_reachable
from medlora.core.io import atomic_directory, sha256_file, write_json, write_jsonl
from medlora.core.tracking import recorded_md5
from medlora.data.schema import read_jsonl_rows, split_path

log = logging.getLogger(__name__)

ORIGINAL_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}
OFFLINE_ADVICE = (
    "To snapshot the real MedMCQA, run `medlora snapshot --source hub` on a machine that can reach the hub "
    "(then commit data.dvc and `dvc push` the data), or download the original release (train.json, dev.json, "
    "test.json) and run `medlora snapshot --source original --path DIR`; `--source synthetic` needs no network."
)


def is_integer(value: Any) -> bool:
    """An integer label (Python or numpy), never a bool: `True` is not answer B."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_row(row: Any, cop: Any) -> dict[str, Any]:
    """A row in the hub schema and key order, with `cop` given; absent columns become null.

    Values are carried as read, whatever their type: judging them is the validate stage's business, so a
    malformed row reaches its suite and is quarantined with its rule instead of stopping the import.
    """
    normalized = {column: row.get(column) for column in COLUMNS}
    normalized["cop"] = cop
    return normalized


def hub_cop(cop: Any) -> Any:
    """The hub's `cop` as an int (a numpy integer from arrow included); anything else as read (null stays null,
    `not_null` flags it; another type, `schema_types`)."""
    return int(cop) if is_integer(cop) else cop


def normalize_hub_rows(rows: Any) -> list[dict[str, Any]]:
    """Hub rows (a `datasets.Dataset` or any iterable of mappings) in schema key order, an integer `cop` as int.

    A row missing a field, or with a value of the wrong type, is carried with it null or as read (see
    `normalize_row`): the validate stage quarantines it and counts it.
    """
    return [normalize_row(row, hub_cop(row.get("cop"))) for row in rows]


def original_cop(cop: Any, unlabeled_allowed: bool) -> Any:
    """The hub's `cop` for an original-release `cop` that is present (1-4 -> 0-3).

    A value the format cannot hold is carried so that the validate stage flags it, never as a label:
      an integer outside 1-4 as `cop - 1`, like every label (5 -> 4, 0 -> -1): outside 0-3, so `cop_in_range`;
        but where -1 is the unlabeled marker the split accepts (`unlabeled_allowed`, the test split), original 0
        would read as "unlabeled" and pass: carried as null, so `not_null`;
      any other type (a string, a float, a bool) as read: `schema_types`.
    """
    if not is_integer(cop):
        return cop
    shifted = int(cop) - 1
    return None if shifted == UNLABELED_COP and unlabeled_allowed else shifted


def normalize_original_rows(
    rows: list[dict[str, Any]], source: str, unlabeled_allowed: bool = False
) -> list[dict[str, Any]]:
    """Original-release rows (`cop` 1-4, absent on the unlabeled test split) in the hub schema.

    An unlabeled row gets `cop` -1 and `exp` "" as the hub's test split has them. A malformed value (a `cop`
    outside 1-4, a missing field) does not stop the import: the row is carried so that the validate stage
    quarantines it (`original_cop`, `normalize_row`) and logged here, naming `source` and the row id;
    `unlabeled_allowed` says whether the split may hold the unlabeled marker (the test split).
    """
    normalized = []
    malformed = []
    for row in rows:
        cop = row.get("cop")
        if cop is None:
            row = {**row, "exp": row.get("exp") or ""}
            normalized.append(normalize_row(row, UNLABELED_COP))
            continue
        if not (is_integer(cop) and 1 <= cop <= 4):
            malformed.append(f"{row.get('id')!r} (cop {cop!r})")
        normalized.append(normalize_row(row, original_cop(cop, unlabeled_allowed)))
    if malformed:
        log.warning(
            "%s: %d row(s) with a cop outside 1-4 (original release format), carried for the validate stage to "
            "quarantine: %s",
            source,
            len(malformed),
            ", ".join(malformed[:5]) + (", ..." if len(malformed) > 5 else ""),
        )
    return normalized


def read_original(directory: str | Path) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Splits from an original-release directory (train.json, dev.json -> validation, test.json).

    Returns (splits, provenance). Raises FileNotFoundError naming missing files, SnapshotParseError (file, line)
    for a file that cannot be parsed at all. A row with a malformed or missing value is not a parse error: it is
    carried into the snapshot for the validate stage to quarantine (`normalize_original_rows`).
    """
    directory = Path(directory)
    missing = [name for name in ORIGINAL_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} (original MedMCQA release format)")
    splits, inputs = {}, {}
    for split, name in ORIGINAL_FILES.items():
        path = directory / name
        rows = read_jsonl_rows(path, required=())
        splits[split] = normalize_original_rows(rows, str(path), unlabeled_allowed=split == "test")
        inputs[name] = sha256_file(path)
    return splits, {"source": "original", "revision": None, "inputs": inputs}


def read_hub(dataset: str, revision: str | None) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Splits of `dataset` at `revision` through `datasets.load_dataset`; raises HubUnavailable offline."""
    ensure_hub_reachable(OFFLINE_ADVICE, datasets=True)
    import datasets  # heavy: only this source needs it

    try:
        loaded = datasets.load_dataset(dataset, revision=revision)
    except (ConnectionError, OSError) as error:
        raise HubUnavailable(f"loading {dataset}@{revision} failed: {error}. {OFFLINE_ADVICE}") from None
    splits = {split: normalize_hub_rows(loaded[split]) for split in SPLITS}
    return splits, {"source": "hub", "dataset": dataset, "revision": revision}


def read_synthetic(config: SnapshotConfig) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The deterministic synthetic splits for `config` (seed and sizes), with their provenance."""
    from medlora.data.synthetic import GENERATOR_VERSION, generate_splits

    splits = generate_splits(config.seed, config.train_size, config.validation_size, config.test_size)
    sizes = {"seed": config.seed, "train_size": config.train_size}
    sizes |= {"validation_size": config.validation_size, "test_size": config.test_size}
    return splits, {"source": "synthetic", "revision": GENERATOR_VERSION, "params": sizes}


def read_source(
    source: str, config: SnapshotConfig, path: str | None = None, revision: str | None = None
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Dispatch to one source; returns (splits, provenance). Raises ValueError for `original` without a path."""
    if source == "synthetic":
        return read_synthetic(config)
    if source == "hub":
        return read_hub(config.hub_dataset, revision or config.revision)
    if source == "original":
        if not path:
            raise ValueError("--source original needs --path DIR (a directory with train.json, dev.json, test.json)")
        return read_original(path)
    raise ValueError(f"unknown snapshot source {source!r} (synthetic | hub | original)")


def write_snapshot(splits: dict[str, list[dict]], data_dir: str | Path, provenance: dict[str, Any]) -> dict:
    """Write the split files and manifest.json into `data_dir` atomically; returns the manifest.

    The manifest holds no timestamp or host detail on purpose: its bytes are part of the md5 data.dvc records.
    """
    with atomic_directory(data_dir) as staging:
        for split in SPLITS:
            write_jsonl(split_path(staging, split), splits[split])
        manifest = {
            **provenance,
            "rows": {split: len(splits[split]) for split in SPLITS},
            "sha256": {split_path(staging, s).name: sha256_file(split_path(staging, s)) for s in SPLITS},
        }
        write_json(Path(staging) / "manifest.json", manifest)
    log.info("wrote %s: %s", data_dir, ", ".join(f"{s} {n}" for s, n in manifest["rows"].items()))
    return manifest


def tracked_dir(data_dir: str | Path) -> Path:
    """The directory DVC tracks: the parent of the snapshot (`data` for `data/medmcqa`)."""
    data_dir = Path(data_dir)
    return data_dir.parent if data_dir.parent != Path(".") else data_dir


def run_dvc(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the DVC of this environment (`python -m dvc`, so a venv that is not on PATH still works)."""
    command = [sys.executable, "-m", "dvc", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if check and result.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(arguments)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def dvc_status_clean(dvc_file: str | Path) -> bool:
    """True when the workspace matches what `dvc_file` records (`dvc status` reports nothing)."""
    result = run_dvc("status", "--json", str(dvc_file), check=False)
    if result.returncode != 0:
        return False
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith(("{", "["))]
    return not lines or not json.loads(lines[-1])


def workspace_matches(tracked: str | Path) -> bool:
    """True when `tracked` hashes to the md5 its .dvc file records, whether or not the DVC cache holds it.

    `dvc status` cannot tell "same bytes, not cached" from "different bytes, not cached" (both read "not in
    cache"); `dvc data status` hashes the workspace and lists a difference under `uncommitted`.
    """
    result = run_dvc("data", "status", "--json", str(tracked))  # the path: a .dvc file as target reports nothing
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith("{")]
    uncommitted = json.loads(lines[-1]).get("uncommitted", {}) if lines else {}
    return not any(uncommitted.values())


def take_snapshot(
    params: Params, source: str | None = None, path: str | None = None, revision: str | None = None, add: bool = True
) -> dict[str, Any]:
    """Write data/medmcqa from `source` (default snapshot.source) and, with `add`, `dvc add` its parent directory.

    Returns the manifest. Raises HubUnavailable, FileNotFoundError or SnapshotParseError from the sources.
    """
    source = source or params.snapshot.source
    splits, provenance = read_source(source, params.snapshot, path=path, revision=revision)
    manifest = write_snapshot(splits, params.paths.data_dir, provenance)
    if not add:
        log.info("%s written, not added to DVC", params.paths.data_dir)
        return manifest
    tracked = tracked_dir(params.paths.data_dir)
    run_dvc("add", str(tracked))
    log.info("dvc add %s: %s records md5 %s", tracked, f"{tracked}.dvc", recorded_md5(f"{tracked}.dvc"))
    return manifest


def repair_dvc_state(root: str | Path = ".") -> list[str]:
    """Undo what a killed DVC leaves that stops every later `dvc` command; returns what was repaired.

    DVC rewrites `.dvc/tmp/rwlock` in place (dvc/rwlock.py), so a SIGKILL mid-write can leave half a JSON document,
    and from then on each command fails with "Unable to read RWLock-file ... JSON structure is corrupted". The file
    only lists which processes read or write which outputs; an unreadable one protects nothing (its processes are
    dead: a live one would have finished the write), so it is removed.
    """
    rwlock = Path(root) / ".dvc" / "tmp" / "rwlock"
    if not rwlock.is_file():
        return []
    try:
        json.loads(rwlock.read_text(encoding="utf-8") or "{}")
        return []
    except (json.JSONDecodeError, UnicodeDecodeError):
        rwlock.unlink()
        log.warning("removed %s: a killed DVC left it half-written, and every dvc command would refuse to run", rwlock)
        return [str(rwlock)]


def restore(config: SnapshotConfig, data_dir: str | Path) -> str:
    """Make the snapshot match its .dvc file; returns how: "clean", "checkout" (DVC cache), "pull" (a DVC
    remote, when one is configured) or "regenerated" (synthetic source, no cache or remote needed).

    Regeneration (synthetic source only) never rewrites the .dvc file; it is accepted only when `dvc status`
    is clean afterwards. Raises FileNotFoundError without a .dvc file and RuntimeError when the snapshot
    cannot be brought back (the message says what to do).
    """
    tracked = tracked_dir(data_dir)
    dvc_file = Path(f"{tracked}.dvc")
    if not dvc_file.is_file():
        raise FileNotFoundError(f"{dvc_file} not found: run `medlora snapshot` to create the snapshot first")
    repair_dvc_state()  # `make run` after a kill: DVC itself must be able to run first
    if dvc_status_clean(dvc_file):
        log.info("%s matches %s: nothing to restore", tracked, dvc_file)
        return "clean"
    if run_dvc("checkout", str(dvc_file), check=False).returncode == 0 and dvc_status_clean(dvc_file):
        log.info("restored %s from the DVC cache", tracked)
        return "checkout"
    remotes = run_dvc("remote", "list", check=False).stdout.strip()
    if remotes and run_dvc("pull", str(dvc_file), check=False).returncode == 0 and dvc_status_clean(dvc_file):
        log.info("pulled %s from the DVC remote", tracked)
        return "pull"
    if config.source != "synthetic":
        raise RuntimeError(
            f"{tracked} is neither in the DVC cache nor on a DVC remote, and snapshot.source {config.source!r} cannot "
            f"be regenerated offline: configure the remote and `dvc pull`, or rerun `medlora snapshot --source "
            f"{config.source}`"
        )
    recorded = dvc_file.read_bytes()
    log.info("regenerating the synthetic snapshot (seed %d) into %s", config.seed, data_dir)
    splits, provenance = read_synthetic(config)
    write_snapshot(splits, data_dir, provenance)
    if not workspace_matches(tracked):
        raise RuntimeError(
            f"the regenerated snapshot does not match {dvc_file} (md5 {recorded_md5(dvc_file)}): params.snapshot "
            "or the synthetic generator changed since it was recorded. Put them back, or record the new snapshot "
            "with `medlora snapshot --source synthetic` (that rewrites data.dvc)."
        )
    # Same md5, so `dvc commit` only fills the cache; the bytes check guards the promise not to rewrite data.dvc.
    run_dvc("commit", "--force", str(dvc_file))
    if dvc_file.read_bytes() != recorded:
        dvc_file.write_bytes(recorded)
        raise RuntimeError(f"`dvc commit` changed {dvc_file}; it was put back. Run `dvc status` to see why.")
    if not dvc_status_clean(dvc_file):
        raise RuntimeError(f"`dvc status {dvc_file}` is not clean after regenerating {tracked}")
    log.info("regenerated %s; it matches %s", tracked, dvc_file)
    return "regenerated"
