"""`medlora snapshot` and `medlora restore`: the DVC-tracked MedMCQA snapshot under `data/medmcqa/`.

    medlora snapshot --source synthetic|hub|original [--path DIR] [--revision REV] [--no-dvc]
    medlora restore

A snapshot is `{train,validation,test}.jsonl` in the hub schema (key order `schema.COLUMNS`; `cop` 0-3, -1 where
unlabeled) plus `manifest.json` (source, revision, row counts, sha256 per file). `snapshot` writes it and runs
`dvc add` on the directory above it (`data`, so `data.dvc` sits at the project root and stage outputs never
overlap it). `restore` brings a fresh clone back to what `data.dvc` records without a DVC remote: the synthetic
source is deterministic and DVC's directory md5 depends only on file names and bytes, so regenerating it
reproduces the recorded md5 exactly, which `dvc status` then confirms.
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
ORIGINAL_REQUIRED = ("id", "question", "opa", "opb", "opc", "opd")
OFFLINE_ADVICE = (
    "To snapshot the real MedMCQA, run `medlora snapshot --source hub` on a machine that can reach the hub "
    "(then commit data.dvc and `dvc push` the data), or download the original release (train.json, dev.json, "
    "test.json) and run `medlora snapshot --source original --path DIR`; `--source synthetic` needs no network."
)


def normalize_row(row: dict[str, Any], cop: int) -> dict[str, Any]:
    """A row in the hub schema and key order, with `cop` given; absent optional columns become null."""
    normalized = {column: row.get(column) for column in COLUMNS}
    normalized["cop"] = cop
    return normalized


def normalize_hub_rows(rows: Any) -> list[dict[str, Any]]:
    """Hub rows (a `datasets.Dataset` or any iterable of mappings) in schema key order, `cop` as int."""
    return [normalize_row(row, int(row["cop"])) for row in rows]


def normalize_original_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Original-release rows (`cop` 1-4, absent on the unlabeled test split) in the hub schema.

    An unlabeled row gets `cop` -1 and `exp` "" as the hub's test split has them. Raises ValueError naming
    `source` and the row id for a `cop` outside 1-4: shifting it silently would invent a label.
    """
    normalized = []
    for row in rows:
        cop = row.get("cop")
        if cop is None:
            row = {**row, "exp": row.get("exp") or ""}
            normalized.append(normalize_row(row, UNLABELED_COP))
        elif isinstance(cop, int) and not isinstance(cop, bool) and 1 <= cop <= 4:
            normalized.append(normalize_row(row, cop - 1))
        else:
            raise ValueError(f"{source}: row {row.get('id')!r}: cop {cop!r} is not 1-4 (original release format)")
    return normalized


def read_original(directory: str | Path) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Splits from an original-release directory (train.json, dev.json -> validation, test.json).

    Returns (splits, provenance). Raises FileNotFoundError naming missing files, SnapshotParseError for a file
    that cannot be parsed.
    """
    directory = Path(directory)
    missing = [name for name in ORIGINAL_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} (original MedMCQA release format)")
    splits, inputs = {}, {}
    for split, name in ORIGINAL_FILES.items():
        path = directory / name
        splits[split] = normalize_original_rows(read_jsonl_rows(path, ORIGINAL_REQUIRED), str(path))
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
