"""What a killed `register` stage leaves behind, found and marked by the next one.

A register stage killed mid-way (SIGKILL, OOM, a pulled plug) can leave, in the tracking store:
- a model version of ours not READY (PENDING_REGISTRATION, or FAILED_REGISTRATION) — half registered;
- a logged model (MLflow 3's LoggedModel) still PENDING: its artifacts were being written;
- the pipeline's MLflow run still RUNNING: the stage had reopened it to log the models.

The next register stage marks each, before it registers anything: the version gets `medlora.abandoned=true` and
`medlora.abandoned_reason` tags (and loses the `challenger` alias if it had it; `find_version` and promotion never
use an abandoned or non-READY version), the logged model is finalized FAILED with the same reason tags, the run is
terminated KILLED with a `medlora.killed_reason` tag. Nothing is deleted: the store keeps the evidence.

Only what a process that is gone left is touched, so a register stage running concurrently (`dvc queue start -j 2`)
is never disturbed: every register stage stamps what it creates with `medlora.owner` = host:pid:start time.
A leftover is abandoned when its owner ran on this host and that pid no longer exists, or, when the owner cannot
be checked (another host, or no stamp: left by an older medlora), once it is older than STALE_AFTER_SECONDS.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from medlora.registry.client import ABANDONED_REASON_TAG, ABANDONED_TAG, CHALLENGER, OWNER_TAG, alias_version, set_alias

logger = logging.getLogger(__name__)

KILLED_REASON_TAG = "medlora.killed_reason"
STALE_AFTER_SECONDS = 24 * 3600
READY = "READY"
LOGGED_MODEL_NAMES = ("adapter", "merged")  # the names register.py logs models under


def parse_owner(owner: str | None) -> tuple[str, int, float] | None:
    """(host, pid, start time) from an owner stamp; None when there is none or it is not one of ours."""
    parts = (owner or "").rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    host, pid, started = parts
    return host, int(pid), float(started)


def owner_gone(owner: str | None, created_seconds: float, now: float | None = None) -> str | None:
    """Why the process `owner` left what it created at `created_seconds` for good (None: it may still be at it)."""
    now = time.time() if now is None else now
    stale = f"older than {STALE_AFTER_SECONDS // 3600} h" if now - created_seconds > STALE_AFTER_SECONDS else None
    parsed = parse_owner(owner)
    if parsed is None:
        return stale and f"no owner recorded and {stale}"
    host, pid, _ = parsed
    if host != socket.gethostname():
        return stale and f"owner {owner} cannot be checked from here and {stale}"
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {owner} no longer runs"
    except PermissionError:
        pass  # alive, another user's
    return stale and f"pid {pid} is alive but the leftover is {stale} (the pid was reused)"


def _paged(search: Any) -> Iterator[Any]:
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def _note(reason: str, marker: str) -> str:
    return f"{reason}; marked by the register stage {marker} at {datetime.now(UTC).isoformat(timespec='seconds')}"


def _run_owner(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.tags.get(OWNER_TAG)
    except Exception:  # the run was deleted: no owner to check
        return None


def mark_versions(client: Any, names: tuple[str, ...], marker: str) -> list[str]:
    """Versions of `names` not READY, left by a gone process: tagged abandoned, stripped of `challenger`."""
    marked = []
    for name in names:
        for version in client.search_model_versions(f"name='{name}'"):
            if version.status == READY or version.tags.get(ABANDONED_TAG) == "true":
                continue
            owner = version.tags.get(OWNER_TAG) or _run_owner(client, version.run_id)
            gone = owner_gone(owner, (version.last_updated_timestamp or version.creation_timestamp) / 1000)
            if not gone:
                logger.info("%s v%s is %s and its owner %s may still run: left alone", name, version.version,
                            version.status, owner)  # fmt: skip
                continue
            reason = f"left {version.status} (half registered): {gone}; never reused"
            client.set_model_version_tag(name, version.version, ABANDONED_TAG, "true")
            client.set_model_version_tag(name, version.version, ABANDONED_REASON_TAG, _note(reason, marker))
            if alias_version(client, name, CHALLENGER) == str(version.version):
                set_alias(client, name, CHALLENGER, None)
            marked.append(f"model version {name}/{version.version}: {reason}")
    return marked


def mark_logged_models(client: Any, experiment_id: str, marker: str) -> list[str]:
    """Our logged models still PENDING, left by a gone process: finalized FAILED, with the reason as tags."""
    marked = []
    models = _paged(lambda token: client.search_logged_models([experiment_id], page_token=token))
    for model in list(models):
        if getattr(model.status, "value", model.status) != "PENDING" or model.name not in LOGGED_MODEL_NAMES:
            continue
        owner = model.tags.get(OWNER_TAG) or _run_owner(client, model.source_run_id)
        gone = owner_gone(owner, model.creation_timestamp / 1000)
        if not gone:
            continue
        reason = f"left PENDING (its artifacts were being written): {gone}"
        client.finalize_logged_model(model.model_id, "FAILED")
        client.set_logged_model_tags(
            model.model_id, {ABANDONED_TAG: "true", ABANDONED_REASON_TAG: _note(reason, marker)}
        )
        marked.append(f"logged model {model.model_id} ({model.name}, run {model.source_run_id}): {reason}")
    return marked


def mark_runs(client: Any, experiment_id: str, marker: str) -> list[str]:
    """Runs a register stage had reopened (OWNER_TAG set) still RUNNING, left by a gone process: ended KILLED.

    Every stage that opens the pipeline's run stamps it (core/tracking.py); a run without the stamp is left alone.
    """
    marked = []
    runs = _paged(lambda token: client.search_runs([experiment_id], "attributes.status = 'RUNNING'", page_token=token))
    for run in list(runs):
        owner = run.data.tags.get(OWNER_TAG)
        if not owner:
            continue
        parsed = parse_owner(owner)
        gone = owner_gone(owner, parsed[2] if parsed else run.info.start_time / 1000)
        if not gone:
            continue
        reason = f"left RUNNING by a killed stage: {gone}"
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, _note(reason, marker))
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(f"run {run.info.run_id}: {reason}")
    return marked


def mark_leftovers(client: Any, experiment_id: str, names: tuple[str, ...], marker: str) -> list[str]:
    """Mark everything killed register stages left (see the module doc); returns one line per thing marked.

    A failure to mark only warns: what is not marked is still never reused (find_version takes READY versions only).
    """
    marked: list[str] = []
    steps = (
        ("model versions", lambda: mark_versions(client, names, marker)),
        ("logged models", lambda: mark_logged_models(client, experiment_id, marker)),
        ("runs", lambda: mark_runs(client, experiment_id, marker)),
    )
    for what, step in steps:
        try:
            marked += step()
        except Exception as error:  # MLflow raises several types; a stale leftover must not block registration
            logger.warning("could not check for %s left by a killed register stage: %s", what, error)
    for line in marked:
        logger.warning("killed register stage's leftover: %s", line)
    return marked
