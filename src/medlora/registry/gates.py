"""The promotion decision, as a pure function: `should_promote(candidate, base, champion, gates) -> Verdict`.

Every gate in `params.yaml` `promote` yields exactly one reason line, passed or failed, so `reports/promotion.json`
says why a version was (or was not) promoted without anyone re-running anything. The gates read the evaluation's
primary metric (`gate` in `reports/eval.json`), where higher is better (accuracy, answer log-likelihood).

Comparisons are written so that a NaN fails every gate it reaches (`nan > x` is False): a broken evaluation can
never promote a model.

Like with like: a value is compared with the champion's only when both were measured the same way (`EvalSet`: the
same metric, the sha256 of the same validation file, the same question limit and data source). Otherwise the two
champion gates FAIL, saying what differs, and a person decides (`medlora promote VERSION --force --reason TEXT`);
nothing re-scores the champion behind their back. An unknown evaluation set (a version registered before it was
recorded) is never taken as equal to anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from medlora.core.config import PromoteConfig
from medlora.core.contracts import EvalGate


@dataclass(frozen=True)
class EvalSet:
    """What a metric value was measured on. Two values are comparable only when every field is known and equal."""

    validation_sha256: str | None  # sha256 of the validation file the evaluation scored
    limit: int | None = None  # evaluate.limit: the first N questions (None: all)
    source: str | None = None  # evaluate.source: local | hub

    def differences(self, champion: EvalSet, champion_version: str) -> list[str]:
        """What differs between this (a candidate's) set and the champion's, in words; [] when comparable."""
        if self.validation_sha256 is None or champion.validation_sha256 is None:
            whose = "candidate's" if self.validation_sha256 is None else f"champion v{champion_version}'s"
            return [f"the {whose} validation data hash is not recorded"]
        found = []
        if self.validation_sha256 != champion.validation_sha256:
            found.append(
                f"validation data sha256 {self.validation_sha256[:12]} vs champion's {champion.validation_sha256[:12]}"
            )
        if self.limit != champion.limit:
            found.append(f"question limit {self.limit} vs champion's {champion.limit}")
        if self.source != champion.source:
            found.append(f"data source {self.source} vs champion's {champion.source}")
        return found

    def tags(self) -> dict[str, str]:
        """As registry tags `eval.<key>` (strings; "None" for no limit)."""
        return {f"eval.{spec.name}": str(getattr(self, spec.name)) for spec in fields(self)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> EvalSet | None:
        """Inverse of `tags`; None when the version carries no `eval.validation_sha256` (registered before it was
        recorded): unknown, which no comparison accepts."""
        sha = tags.get("eval.validation_sha256")
        if not sha or sha == "None":
            return None
        limit = tags.get("eval.limit")
        source = tags.get("eval.source")
        return cls(
            validation_sha256=sha,
            limit=None if limit in (None, "", "None") else int(limit),
            source=None if source in (None, "", "None") else source,
        )


@dataclass(frozen=True)
class Candidate:
    """What the gates need to know about one trained adapter (and its merged copy)."""

    metric: str
    value: float  # the adapter's value of the primary metric
    merged: float | None = None  # the merged model's value; None when it was not evaluated
    p_value: float | None = None  # significance of the uplift over the base model
    validation_success: bool | None = None  # reports/validation.json `success`
    coverage_passed: bool | None = None  # the LoRA coverage gate from reports/train.json
    version: str | None = None  # registered adapter version, when there is one
    evaluated_on: EvalSet | None = None  # what `value` was measured on (None: unknown, never comparable)


@dataclass(frozen=True)
class Champion:
    """The version currently holding the `champion` alias, with the metric it was promoted on."""

    version: str
    metric: str
    value: float
    evaluated_on: EvalSet | None = None  # what `value` was measured on (None: unknown, never comparable)


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [reason for reason in self.reasons if reason.startswith("FAIL")]


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _line(passed: bool, gate: str, text: str) -> str:
    return f"{'PASS' if passed else 'FAIL'} {gate}: {text}"


def check_min_value(candidate: Candidate, gates: PromoteConfig) -> str:
    if gates.min_value is None:
        return _line(True, "min_value", f"no floor set ({candidate.metric} = {_fmt(candidate.value)})")
    passed = candidate.value >= gates.min_value
    sign = ">=" if passed else "<"
    return _line(passed, "min_value", f"{candidate.metric} {_fmt(candidate.value)} {sign} {_fmt(gates.min_value)}")


def check_uplift(candidate: Candidate, base: float, gates: PromoteConfig) -> str:
    uplift = candidate.value - base
    passed = uplift > gates.min_uplift
    sign = ">" if passed else "<="
    return _line(
        passed,
        "min_uplift",
        f"uplift {_fmt(uplift)} (adapter {_fmt(candidate.value)} - base {_fmt(base)}) {sign} {_fmt(gates.min_uplift)}",
    )


def check_p_value(candidate: Candidate, gates: PromoteConfig) -> str:
    if candidate.p_value is None:
        return _line(False, "max_p_value", "no p-value for the uplift (evaluation did not run a paired test)")
    passed = candidate.p_value < gates.max_p_value
    sign = "<" if passed else ">="
    return _line(passed, "max_p_value", f"p-value {_fmt(candidate.p_value)} {sign} {_fmt(gates.max_p_value)}")


NOT_COMPARABLE_RULE = "re-evaluate both on the same data or decide by hand (medlora promote VERSION --force --reason)"


def comparability(candidate: Candidate, champion: Champion) -> str:
    """Why the candidate's value cannot be compared with the champion's ("" when it can)."""
    reasons = []
    if champion.metric != candidate.metric:
        reasons.append(
            f"champion v{champion.version} was promoted on {champion.metric}, candidate on {candidate.metric}"
        )
    if candidate.evaluated_on is None or champion.evaluated_on is None:
        whose = "candidate's" if candidate.evaluated_on is None else f"champion v{champion.version}'s"
        reasons.append(f"the {whose} evaluation data is not recorded")
    else:
        reasons.extend(candidate.evaluated_on.differences(champion.evaluated_on, champion.version))
    return "; ".join(reasons)


def check_champion(candidate: Candidate, champion: Champion | None, gates: PromoteConfig) -> list[str]:
    """Two lines: not worse than the champion by more than the tolerance; better by more than the margin."""
    if champion is None:
        text = "no champion yet (first promotion)"
        return [_line(True, "champion_tolerance", text), _line(True, "champion_margin", text)]
    if candidate.version is not None and candidate.version == champion.version:
        text = f"candidate is the current champion (v{champion.version})"
        return [_line(True, "champion_tolerance", text), _line(True, "champion_margin", text)]
    mismatch = comparability(candidate, champion)
    if mismatch:
        # Different metrics (a preset change) or data (a new snapshot): not comparable, a person decides (--force).
        text = f"not comparable with champion v{champion.version}: {mismatch}; {NOT_COMPARABLE_RULE}"
        return [_line(False, "champion_tolerance", text), _line(False, "champion_margin", text)]
    delta = candidate.value - champion.value
    head = f"{candidate.metric} {_fmt(candidate.value)} vs champion v{champion.version} {_fmt(champion.value)}"
    tolerated = delta >= -gates.champion_tolerance
    beats = delta > gates.champion_margin  # a tie never replaces the champion
    tolerance_text = (
        f"{head}: delta {_fmt(delta)} {'>=' if tolerated else '<'} {_fmt(-gates.champion_tolerance or 0.0)}"
    )
    margin_text = f"{head}: delta {_fmt(delta)} {'>' if beats else '<='} {_fmt(gates.champion_margin)}"
    return [_line(tolerated, "champion_tolerance", tolerance_text), _line(beats, "champion_margin", margin_text)]


def merged_relative_difference(candidate: Candidate) -> float:
    """|merged - adapter| / |adapter| (absolute difference when the adapter's value is 0; inf if not evaluated)."""
    if candidate.merged is None:
        return math.inf
    difference = abs(candidate.merged - candidate.value)
    if candidate.value == 0:
        return difference if difference == 0 else math.inf
    return difference / abs(candidate.value)


def check_merged(candidate: Candidate, gates: PromoteConfig) -> str:
    if candidate.merged is None:
        return _line(False, "max_merged_vs_adapter_rel", "the merged model was not evaluated")
    relative = merged_relative_difference(candidate)
    passed = relative <= gates.max_merged_vs_adapter_rel
    sign = "<=" if passed else ">"
    return _line(
        passed,
        "max_merged_vs_adapter_rel",
        f"|merged {_fmt(candidate.merged)} - adapter {_fmt(candidate.value)}| / |adapter| = {_fmt(relative)} "
        f"{sign} {_fmt(gates.max_merged_vs_adapter_rel)}",
    )


def check_verdict(name: str, verdict: bool | None, required: bool, source: str) -> str:
    """One line for a yes/no verdict of an earlier stage (data validation, LoRA coverage)."""
    said = {True: "passed", False: "failed", None: "missing"}[verdict]
    if not required:
        return _line(True, name, f"not required ({source} {said})")
    return _line(verdict is True, name, f"{source} {said}")


def should_promote(candidate: Candidate, base: float, champion: Champion | None, gates: PromoteConfig) -> Verdict:
    """Run every gate; promote only when all pass. One reason per gate, in a fixed order, passed or failed.

    `base` is the base model's value of the candidate's metric; `champion` is None before the first promotion.
    """
    reasons = [
        check_min_value(candidate, gates),
        check_uplift(candidate, base, gates),
        check_p_value(candidate, gates),
        *check_champion(candidate, champion, gates),
        check_merged(candidate, gates),
        check_verdict("validation", candidate.validation_success, gates.require_validation, "data validation"),
        check_verdict("coverage", candidate.coverage_passed, gates.require_coverage, "LoRA coverage gate"),
    ]
    return Verdict(promote=all(reason.startswith("PASS") for reason in reasons), reasons=reasons)


def _flag(value: Any) -> bool | None:
    """A verdict from a report (a bool) or a version tag ("True"/"False"/"None")."""
    if isinstance(value, bool) or value is None:
        return value
    return {"true": True, "false": False}.get(str(value).lower())


def candidate_from_gate(
    gate: EvalGate,
    validation_success: Any,
    coverage_passed: Any,
    version: str | None = None,
    evaluated_on: EvalSet | None = None,
) -> tuple[Candidate, float]:
    """(Candidate, base value) from the evaluation's gate (eval.json, or the version tags that copy it) and what
    it was measured on (`evaluated_on`; None: unknown, so no champion comparison can pass).

    Raises ValueError when the gate lacks the base or adapter value (the evaluation did not run them).
    """
    for key in ("base", "adapter"):
        if getattr(gate, key) is None:
            raise ValueError(f"evaluation gate on {gate.metric} has no {key!r} value: evaluate.models must include it")
    candidate = Candidate(
        metric=gate.metric,
        value=float(gate.adapter),
        merged=gate.merged,
        p_value=gate.p_value,
        validation_success=_flag(validation_success),
        coverage_passed=_flag(coverage_passed),
        version=version,
        evaluated_on=evaluated_on,
    )
    return candidate, float(gate.base)


def champion_from_tags(version: str, tags: dict[str, str]) -> Champion:
    """The champion's metric and value, from the tags its version was registered with."""
    if not tags.get("gate.metric"):
        raise ValueError(f"champion v{version} has no gate.metric tag: it cannot be compared against")
    gate = EvalGate.from_tags(tags)
    if gate.adapter is None:
        raise ValueError(f"champion v{version} has no gate.adapter tag: it cannot be compared against")
    return Champion(version=str(version), metric=gate.metric, value=gate.adapter, evaluated_on=EvalSet.from_tags(tags))
