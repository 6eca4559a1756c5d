"""The registry's shared vocabulary: the store, aliases and the status table.

The `register` stage (register.py) adds versions and labels them `challenger`; only promote.py gives out `champion`
(both through `set_alias`, the one place aliases are written). `medlora status` prints `status_rows`.
"""

from __future__ import annotations

import logging
from typing import Any

from medlora.core import tracking
from medlora.core.config import Params
from medlora.core.tracking import configure_tracking, tracking_uri
from medlora.registry.gates import Champion, champion_from_tags

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# The process (host:pid:start) that created a version or logged model, or has a run open: stamped by the register
# stage, so the next one can tell what a killed one left (recovery.py).
OWNER_TAG = tracking.OWNER_TAG  # one definition: core/tracking stamps every pipeline run with it
# On a version (or logged model) a killed register stage left half done: never reused or promoted (recovery.py).
ABANDONED_TAG = "medlora.abandoned"
ABANDONED_REASON_TAG = "medlora.abandoned_reason"


class RegistryError(RuntimeError):
    """The tracking store could not be read or written; the message says which step and what state it left."""


def open_registry(params: Params) -> Any:
    """An MlflowClient on the project's store; raises RegistryError naming the store when it cannot be reached."""
    from mlflow import MlflowClient

    try:
        configure_tracking(params)
        return MlflowClient()
    except Exception as error:  # MLflow raises several types (MlflowException, requests, sqlalchemy errors)
        raise RegistryError(
            f"tracking store {tracking_uri(params.paths.mlruns_dir)} is unreachable: {error}. Nothing was changed."
        ) from error


def usable(version: Any) -> bool:
    """A version fully registered (READY) and not marked abandoned: the only kind found, reused or promoted."""
    return version.status == "READY" and version.tags.get(ABANDONED_TAG) != "true"


def find_version(client: Any, name: str, tags: dict[str, str]) -> Any | None:
    """The newest usable version of `name` carrying all `tags`, or None (also when the model does not exist yet).

    Half-registered versions (not READY, or marked abandoned by recovery.py) are never returned.
    """
    conditions = " and ".join([f"name='{name}'", *(f"tags.{key}='{value}'" for key, value in tags.items())])
    versions = [version for version in client.search_model_versions(conditions) if usable(version)]
    return max(versions, key=lambda v: int(v.version)) if versions else None


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """Which version of `name` holds `alias` (None when the alias or the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def current_champion(client: Any, name: str) -> Champion | None:
    """The champion of registered model `name`, with the metric it was promoted on (from its version tags)."""
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None
    return champion_from_tags(version, client.get_model_version(name, version).tags)


def set_alias(client: Any, name: str, alias: str, version: str | None) -> None:
    """Point `alias` of `name` at `version` (None deletes it). The one place aliases are written."""
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)


def status_rows(client: Any, params: Params) -> list[dict[str, str]]:
    """One row per adapter version, newest first: aliases of it and of its merged twin, and the key metrics."""
    from mlflow.exceptions import MlflowException

    def aliases_of(name: str) -> dict[str, list[str]]:
        try:
            by_alias = client.get_registered_model(name).aliases
        except MlflowException:
            return {}
        found: dict[str, list[str]] = {}
        for alias, version in by_alias.items():
            found.setdefault(str(version), []).append(alias)
        return found

    names = params.register
    adapter_aliases, merged_aliases = aliases_of(names.adapter_name), aliases_of(names.merged_name)
    rows = []
    for version in sorted(client.search_model_versions(f"name='{names.adapter_name}'"), key=lambda v: -int(v.version)):
        tags, merged = version.tags, version.tags.get("merged_version", "-")
        rows.append(
            {
                "adapter": str(version.version),
                "merged": merged,
                "aliases": ",".join(sorted(adapter_aliases.get(str(version.version), []))) or "-",
                "merged_aliases": ",".join(sorted(merged_aliases.get(merged, []))) or "-",
                "metric": tags.get("gate.metric", "-"),
                "adapter_value": _number_text(tags.get("gate.adapter", "-")),
                "base": _number_text(tags.get("gate.base", "-")),
                "p_value": _number_text(tags.get("gate.p_value", "-")),
                "validation": tags.get("validation_success", "-"),
                "coverage": tags.get("coverage_passed", "-"),
                "run": (version.run_id or "-")[:8],
                "commit": tags.get("git_commit", "-")[:8],
                "state": "ready" if usable(version) else ("abandoned" if tags.get(ABANDONED_TAG) else version.status),
            }
        )
    return rows


def _number_text(value: str) -> str:
    """A tag holding a number, to 4 significant digits (tags are strings; "None" and "-" stay as they are)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows as aligned text columns, headed by the keys."""
    if not rows:
        return "no registered versions yet (run the pipeline: make run)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)
