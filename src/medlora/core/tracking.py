"""MLflow tracking and registry setup: SQLite store under `mlruns/`, one run per pipeline run.

The train stage opens the pipeline's run and records its id in `reports/train.json` (`mlflow_run_id`); merge,
evaluate and register reopen that run, so one pipeline run is one MLflow run a user can compare in the UI.
`MLFLOW_TRACKING_URI` (for instance a shared `mlflow server`) overrides the local store.

One project, one store, wherever a stage runs:
- `dvc exp run --temp` and queued experiments run the stages in a throwaway copy under `.dvc/tmp/exps/`; a relative
  `paths.mlruns_dir` is resolved against the project's root (`project_root`), not against that copy.
- SQLite records absolute artifact paths; when the project was moved or copied, `relocate_store` rewrites them to
  this project's `mlruns/` before anything is written (`configure_tracking` calls it), so a copy never writes into
  the folder it was copied from.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from medlora.core.config import Params

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "medlora"

# What DVC puts in a stage command's environment (dvc/env.py; set in dvc/stage/run.py and, for `dvc exp run`,
# dvc/repo/experiments/queue/base.py). DVC_ROOT is the root of the project the stage belongs to: for `--temp` and
# queued experiments DVC overrides it with the parent repository's root, not the executor's temporary copy.
DVC_ROOT = "DVC_ROOT"
DVC_EXP_NAME = "DVC_EXP_NAME"
DVC_EXP_BASELINE_REV = "DVC_EXP_BASELINE_REV"
# Where DVC 3 puts the temporary copies (dvc.repo.experiments.utils.EXEC_TMP_DIR under the repo's .dvc/tmp).
_EXECUTOR_DIR_PARTS = (".dvc", "tmp", "exps")


# `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ (so child processes inherit it). A
# value we put there ourselves is not a user's override: remember it, so a later call for another store (another
# project directory in the same process, as in tests) is not sent to the first one.
_uri_set_by_us: str | None = None


def project_root(cwd: str | Path | None = None) -> Path:
    """The project directory relative store paths are relative to, also from inside a DVC experiment's temp copy.

    DVC_ROOT when DVC runs the stage (the workspace itself, or for `--temp`/queued experiments the project they were
    queued from); else the working directory, unless it lies in a DVC executor copy (`<root>/.dvc/tmp/exps/...`).
    """
    here = Path(cwd or Path.cwd()).resolve()
    from_dvc = os.environ.get(DVC_ROOT)
    if from_dvc:
        return Path(from_dvc).resolve()
    # Fallback, path layout (a stage script started by hand inside an executor copy, or a DVC that sets no
    # DVC_ROOT): DVC 3 creates its executor copies in <root>/.dvc/tmp/exps/<name>/.
    parts = here.parts
    for i in range(len(parts) - len(_EXECUTOR_DIR_PARTS)):
        if parts[i : i + len(_EXECUTOR_DIR_PARTS)] == _EXECUTOR_DIR_PARTS:
            return Path(*parts[:i])
    return here


def store_dir(mlruns_dir: str | Path) -> Path:
    """The absolute store directory: `paths.mlruns_dir`, relative to the project root (`project_root`)."""
    path = Path(mlruns_dir).expanduser()
    return (path if path.is_absolute() else project_root() / path).resolve()


def tracking_uri(mlruns_dir: str | Path) -> str:
    """`sqlite:///<absolute>/mlflow.db`, unless the user's MLFLOW_TRACKING_URI says otherwise.

    Absolute, and relative to the project root, because `dvc exp run --temp` and queued experiments run in
    another directory.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env and from_env != _uri_set_by_us:
        return from_env
    return f"sqlite:///{store_dir(mlruns_dir) / 'mlflow.db'}"


def artifact_location(mlruns_dir: str | Path) -> str:
    return (store_dir(mlruns_dir) / "artifacts").as_uri()


# Every column in which MLflow 3.17's SQLite schema stores an absolute artifact path or URI.
_LOCATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("trace_tags", "value"),  # mlflow.artifactLocation of traces
)


def _local_path(location: str) -> Path | None:
    """The local directory an artifact location names (a file: URI or a plain absolute path), else None."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def relocate_store(mlruns_dir: str | Path) -> bool:
    """Point a moved or copied store's recorded artifact paths at this store's `artifacts/`; True when it did.

    The experiment's artifact root says where the store was created. When that is another directory's
    `mlruns/artifacts` (the project was moved or copied), every stored path under the old `mlruns/` (experiment
    roots, run artifact URIs, logged and registered model locations) is rewritten to the same path under this one,
    in one transaction. Leaves stores alone whose artifact root is not a local `.../artifacts` folder.
    """
    store = store_dir(mlruns_dir)
    db = store / "mlflow.db"
    if not db.is_file():
        return False
    with closing(sqlite3.connect(db, timeout=60)) as connection:
        try:
            row = connection.execute(
                "SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT_NAME,)
            ).fetchone()
        except sqlite3.OperationalError:  # not an MLflow store yet
            return False
        recorded = _local_path(row[0]) if row and row[0] else None
        if recorded is None or recorded.name != "artifacts" or recorded.parent == store:
            return False
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        old, new = recorded.parent, store
        changed = 0
        with connection:  # one transaction: all paths move, or none
            for table, column in _LOCATION_COLUMNS:
                if table not in tables:
                    continue
                for old_prefix, new_prefix in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                    cursor = connection.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # names: _LOCATION_COLUMNS
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (new_prefix, len(old_prefix) + 1, old_prefix, len(old_prefix) + 1, old_prefix + "/"),
                    )
                    changed += cursor.rowcount
    logger.warning(
        "the MLflow store %s was created in %s (project moved or copied): rewrote %d stored artifact paths to %s",
        db,
        old,
        changed,
        new,
    )
    if not (store / "artifacts").is_dir():
        logger.warning("%s does not exist: copy %s/artifacts along with mlflow.db", store / "artifacts", old)
    return True


def configure_tracking(params: Params) -> str:
    """Point MLflow (tracking and registry) at the project's store and make sure the experiment exists.

    Returns the experiment id.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    global _uri_set_by_us
    mlruns = store_dir(params.paths.mlruns_dir)
    uri = tracking_uri(mlruns)
    local = uri == f"sqlite:///{mlruns / 'mlflow.db'}"
    if local:
        mlruns.mkdir(parents=True, exist_ok=True)
        relocate_store(mlruns)
        _uri_set_by_us = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_location(mlruns) if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=location)


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's sha (with `-dirty` when the work tree has changes), or "unknown" outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # dvc.lock is rewritten by the very `dvc repro` that runs us: not a sign of uncommitted code or params.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"],
            cwd=cwd,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def recorded_md5(dvc_file: str | Path) -> str:
    """The md5 a .dvc file records for its output; raises OSError/KeyError/YAMLError when there is none."""
    return str(yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8"))["outs"][0]["md5"])


def data_dvc_md5(path: str | Path = "data.dvc") -> str:
    """The md5 that `data.dvc` records for the snapshot directory, or "unknown"."""
    try:
        return recorded_md5(path)
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


def dvc_lock_md5(stage: str, out_path: str, lock: str | Path = "dvc.lock") -> str:
    """The md5 `dvc.lock` records for one output of one stage, or "unknown" (stage not run through DVC)."""
    try:
        spec = yaml.safe_load(Path(lock).read_text())
        for out in spec["stages"][stage]["outs"]:
            if out["path"] == out_path:
                return str(out["md5"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    return "unknown"


def lineage_tags(params: Params) -> dict[str, str]:
    """Tags every run and registered version carries: where the code, data and configuration came from."""
    return {
        "git_commit": git_commit(),
        "data_dvc_md5": data_dvc_md5(),
        "params_hash": params.params_hash(),
        "model_preset": params.model.preset,
    }


def changed_params(params: Params) -> dict[str, Any]:
    """`section.key -> value` of every param that differs from the defaults (`Params()`)."""
    defaults = Params().flat()
    return {key: value for key, value in params.flat().items() if defaults.get(key) != value}


def _short(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


# Sections in the order a run name lists their changes: what people sweep first, data and paths last.
_NAME_ORDER = ("train", "lora", "model", "format", "evaluate", "merge", "promote", "register", "snapshot", "validate")


def run_name(params: Params, max_chars: int = 60) -> str:
    """A name a person can tell runs apart by in the MLflow UI.

    The DVC experiment's name when DVC gives one (`dvc exp run` sets DVC_EXP_NAME, the name `dvc exp show`
    lists), else the params that differ from the defaults, training first and shortened
    ("learning_rate=0.001 max_steps=1 +2"), else the start time ("run-20260101-120000").
    """
    from_dvc = os.environ.get(DVC_EXP_NAME)
    if from_dvc:
        return from_dvc
    changed = changed_params(params)
    order = {section: i for i, section in enumerate(_NAME_ORDER)}
    keys = sorted(changed, key=lambda key: order.get(key.split(".", 1)[0], len(order)))
    leaves = [key.split(".", 1)[1] for key in keys]
    parts = [
        f"{leaf if leaves.count(leaf) == 1 else key}={_short(changed[key])}"
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    name = ""
    for i, part in enumerate(parts):
        rest = len(parts) - i - 1
        candidate = f"{name} {part}".strip()
        if name and len(candidate) + (len(f" +{rest}") if rest else 0) > max_chars:
            return f"{name} +{len(parts) - i}"
        name = candidate
    return name or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


def experiment_tags(params: Params) -> dict[str, str]:
    """Run tags that say which DVC experiment and which param changes a run came from (searchable in the UI)."""
    tags = {"params_changed": " ".join(f"{k}={v}" for k, v in changed_params(params).items())[:5000] or "none"}
    for tag, variable in (("dvc_exp_name", DVC_EXP_NAME), ("dvc_exp_baseline_rev", DVC_EXP_BASELINE_REV)):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


# Who has a run open: host:pid:start time. registry/recovery.py ends a RUNNING run whose owner process is gone (a
# killed stage), and leaves one whose owner still runs (a stage at work) alone.
OWNER_TAG = "medlora.owner"


def owner_stamp() -> str:
    """This process, as the owner of what it opens or creates: host:pid:start time (epoch seconds)."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"


def start_pipeline_run(params: Params, run_name: str | None = None) -> Any:
    """Open a new MLflow run for this pipeline run with every param, the lineage and the experiment tags."""
    import mlflow

    experiment_id = configure_tracking(params)
    tags = {**lineage_tags(params), **experiment_tags(params), OWNER_TAG: owner_stamp()}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    flat = {key: str(value)[:6000] for key, value in params.flat().items()}
    mlflow.log_params(flat)
    return run


def resume_pipeline_run(params: Params, run_id: str) -> Any:
    """Reopen the pipeline's run (as recorded by the train stage) from a later stage."""
    import mlflow

    configure_tracking(params)
    run = mlflow.start_run(run_id=run_id)
    mlflow.set_tag(OWNER_TAG, owner_stamp())  # this stage has it open now: a kill from here on is this stage's
    return run
