"""The `promote` stage's verb, `medlora promote VERSION`, and `medlora rollback`: moving the `champion` alias.

The decision is `gates.should_promote` (pure); this module only moves aliases, for both registered models together,
so the adapter champion and the merged champion always come from the same pipeline run. A move is a small
transaction: every write has an undo, and when one fails the writes already made are undone in reverse order, so
`champion` never points at a version that did not pass (or at a pair from two different runs). The replaced
champion is pushed on a `champion_history` tag of each registered model (`previous_champion` shows the top), which
is what `medlora rollback` pops.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import EvalGate, EvalReport, PromotionReport, Registration, TrainReport, ValidationReport
from medlora.registry.client import (
    ABANDONED_REASON_TAG,
    CHALLENGER,
    CHAMPION,
    RegistryError,
    alias_version,
    current_champion,
    open_registry,
    set_alias,
    usable,
)
from medlora.registry.gates import EvalSet, Verdict, candidate_from_gate, should_promote

logger = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"
PREVIOUS_TAG = "previous_champion"

Step = tuple[str, Callable[[], None], Callable[[], None]]  # (what it does, do, undo)


def read_history(client: Any, name: str) -> list[str]:
    """Versions that held `champion` before the current one, oldest first."""
    value = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in value.split(",") if v]


def write_history(client: Any, name: str, history: list[str]) -> None:
    """Replace the champion history of `name`; `previous_champion` shows its top (absent when it is empty)."""
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    if history:
        client.set_registered_model_tag(name, PREVIOUS_TAG, history[-1])
    elif PREVIOUS_TAG in client.get_registered_model(name).tags:
        client.delete_registered_model_tag(name, PREVIOUS_TAG)


def run_transaction(steps: list[Step]) -> None:
    """Run (description, do, undo) steps in order; on a failure undo the done ones in reverse, then raise.

    Raises RegistryError saying which step failed and whether the undo restored the state before the transaction.
    """
    done: list[tuple[str, Callable[[], None]]] = []
    for description, do, undo in steps:
        try:
            do()
        except Exception as error:
            failed_undos = []
            for done_description, done_undo in reversed(done):
                try:
                    done_undo()
                except Exception as undo_error:
                    failed_undos.append(f"{done_description} ({undo_error})")
            if failed_undos:
                raise RegistryError(
                    f"failed to {description}: {error}. Undoing the earlier writes ALSO failed for: "
                    f"{'; '.join(failed_undos)}. Check `medlora status` and repair the aliases by hand."
                ) from error
            restored = f"undid {len(done)} earlier write(s); the aliases are as before" if done else "nothing changed"
            raise RegistryError(f"failed to {description}: {error}. {restored}.") from error
        done.append((description, undo))


def move_champion(
    client: Any, targets: dict[str, str], pop_history: bool = False, first: list[Step] | None = None
) -> dict[str, str | None]:
    """Give `champion` to `targets` (registered model name -> version) in one transaction; returns the old champions.

    A promotion pushes each replaced champion on its model's history; a rollback (`pop_history`) pops it instead.
    `first` steps (say, recording a forced promotion) run before, then history, then the aliases, so after any
    failure the undo leaves tags and aliases exactly as they were.
    """
    before = {name: alias_version(client, name, CHAMPION) for name in targets}
    steps = list(first or [])
    for name, version in targets.items():
        old = read_history(client, name)
        if pop_history:
            new = old[:-1]
        elif before[name] is not None and before[name] != version:
            new = [*old, before[name]]
        else:
            continue  # nothing to record (first promotion, or the champion promoted again)
        steps.append(
            (
                f"record the previous champion of {name}",
                lambda n=name, h=new: write_history(client, n, h),
                lambda n=name, h=old: write_history(client, n, h),
            )
        )
    for name, version in targets.items():
        steps.append(
            (
                f"point {name}@{CHAMPION} at version {version}",
                lambda n=name, v=version: set_alias(client, n, CHAMPION, v),
                lambda n=name, v=before[name]: set_alias(client, n, CHAMPION, v),
            )
        )
    run_transaction(steps)
    return before


def promote_version(
    params: Params,
    adapter_version: str,
    gate: EvalGate | None = None,
    verdicts: tuple[bool | None, bool | None] | None = None,
    force_reason: str | None = None,
    evaluated_on: EvalSet | None = None,
) -> PromotionReport:
    """Run the gates on adapter version `adapter_version` (and its merged twin); move `champion` if they pass.

    `gate`, `verdicts` (validation, coverage) and `evaluated_on` (what the gate was measured on) default to the
    version's own tags. `force_reason` promotes despite failed gates and records who, when and why as version tags.
    A version a killed register stage left half registered is refused, even by force. Returns the promotion report.
    """
    client = open_registry(params)
    names = params.register
    try:
        adapter = client.get_model_version(names.adapter_name, adapter_version)
        tags = adapter.tags
        merged_version = tags.get("merged_version")  # its twin, registered from the same run (None: none)
        twin = client.get_model_version(names.merged_name, merged_version) if merged_version else None
        for entry in (adapter, twin):
            if entry is not None and not usable(entry):
                why = entry.tags.get(ABANDONED_REASON_TAG, f"status {entry.status}")
                raise RegistryError(f"{entry.name} v{entry.version} is not fully registered ({why}): not promoted")
        champion = current_champion(client, names.adapter_name)
        before = {name: alias_version(client, name, CHAMPION) for name in (names.adapter_name, names.merged_name)}
    except RegistryError:
        raise
    except Exception as error:
        raise RegistryError(f"cannot read version {adapter_version} of {names.adapter_name}: {error}") from error
    validation, coverage = verdicts or (tags.get("validation_success"), tags.get("coverage_passed"))
    candidate, base = candidate_from_gate(
        gate or EvalGate.from_tags(tags),
        validation,
        coverage,
        str(adapter_version),
        evaluated_on=evaluated_on or EvalSet.from_tags(tags),
    )
    verdict = should_promote(candidate, base, champion, params.promote)
    if merged_version is None:
        reason = f"FAIL merged_registered: adapter v{adapter_version} has no merged version (register.register_merged)"
        verdict = Verdict(promote=False, reasons=[*verdict.reasons, reason])
    promote = verdict.promote or (force_reason is not None and merged_version is not None)
    if promote:
        targets = {names.adapter_name: str(adapter_version), names.merged_name: merged_version}
        forced = force_reason is not None and not verdict.promote
        move_champion(client, targets, first=force_steps(client, targets, force_reason, verdict) if forced else None)
        drop_challenger(client, {names.adapter_name: str(adapter_version), names.merged_name: merged_version})
    elif force_reason is not None:
        raise RegistryError(f"cannot force adapter v{adapter_version}: it has no merged version to serve with it")
    try:  # read back: what the registry says now, not what we meant to write
        after = {name: alias_version(client, name, CHAMPION) for name in (names.adapter_name, names.merged_name)}
    except Exception as error:
        raise RegistryError(
            f"adapter v{adapter_version} {'promoted' if promote else 'rejected'}, but reading the "
            f"aliases back failed: {error}"
        ) from error
    decision = "promoted" if promote else "rejected"
    logger.info("adapter v%s %s: %s", adapter_version, decision, "; ".join(verdict.failed) or "every gate passed")
    return PromotionReport(
        candidate={names.adapter_name: str(adapter_version), names.merged_name: merged_version},
        decision=decision,
        forced=bool(promote and not verdict.promote),
        reasons=verdict.reasons,
        champion_before=before,
        champion_after=after,
    )


def set_version_tags(client: Any, name: str, version: str, tags: dict[str, str | None]) -> None:
    """Set (or, for None values, delete) tags of one model version."""
    for key, value in tags.items():
        if value is None:
            client.delete_model_version_tag(name, version, key)
        else:
            client.set_model_version_tag(name, version, key, value)


def force_steps(client: Any, targets: dict[str, str], reason: str, verdict: Verdict) -> list[Step]:
    """Transaction steps that record who overrode which gates, when and why, as tags on both versions."""
    tags = {
        "forced_by": f"{getpass.getuser()}@{socket.gethostname()}",
        "forced_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "forced_reason": reason,
        "forced_failed_gates": "; ".join(verdict.failed)[:4000],
    }
    logger.warning("promoting %s by force (%s) despite: %s", targets, reason, tags["forced_failed_gates"])
    return [
        (
            f"record the forced promotion on {name} version {version}",
            lambda n=name, v=version: set_version_tags(client, n, v, tags),
            lambda n=name, v=version: set_version_tags(client, n, v, dict.fromkeys(tags)),
        )
        for name, version in targets.items()
    ]


def drop_challenger(client: Any, promoted: dict[str, str]) -> None:
    """The new champion is no longer a challenger; a failure here leaves only a stale label, so it only warns."""
    for name, version in promoted.items():
        try:
            if alias_version(client, name, CHALLENGER) == version:
                set_alias(client, name, CHALLENGER, None)
        except Exception as error:
            logger.warning("could not remove %s@%s from version %s: %s", name, CHALLENGER, version, error)


def rollback(params: Params) -> dict[str, str | None]:
    """Give `champion` back to the versions it replaced (both models); returns the champion now, per model."""
    client = open_registry(params)
    names = (params.register.adapter_name, params.register.merged_name)
    histories = {name: read_history(client, name) for name in names}
    if not all(histories.values()):
        raise RegistryError("no previous champion is recorded: there is nothing to roll back to")
    targets = {name: history[-1] for name, history in histories.items()}
    before = move_champion(client, targets, pop_history=True)
    logger.info("rolled back champion %s -> %s", before, targets)
    return targets


def run(params: Params) -> PromotionReport:
    """The `promote` stage: the gates, from this run's reports, on the versions in reports/registration.json."""
    reports = params.paths.reports_dir
    registration = Registration.read(reports)
    train, validation = TrainReport.read(reports), ValidationReport.read(reports)
    return promote_version(
        params,
        registration.adapter.version,
        gate=EvalReport.read(reports).gate,
        verdicts=(validation.success, train.coverage_passed),
        evaluated_on=EvalSet.from_tags(registration.tags),  # as the register stage recorded it from eval.json
    )
