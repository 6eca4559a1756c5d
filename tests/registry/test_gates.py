"""`should_promote`: every gate both ways, the first promotion, ties, NaN, and the tag round trip."""

from __future__ import annotations

import math

import pytest

from medlora.core.config import PromoteConfig
from medlora.core.contracts import EvalGate
from medlora.registry.gates import (
    Candidate,
    Champion,
    candidate_from_gate,
    champion_from_tags,
    merged_relative_difference,
    should_promote,
)

METRIC = "medmcqa_chat_loglik/answer_loglik"
GATES = PromoteConfig(
    min_value=-10.0,
    min_uplift=0.5,
    max_p_value=0.01,
    champion_tolerance=0.1,
    champion_margin=0.2,
    max_merged_vs_adapter_rel=0.01,
)
BASE = -8.0
GATE_ORDER = [
    "min_value",
    "min_uplift",
    "max_p_value",
    "champion_tolerance",
    "champion_margin",
    "max_merged_vs_adapter_rel",
    "validation",
    "coverage",
]


def good(**changes) -> Candidate:
    """A candidate that passes every gate of GATES against champion() (value -5 vs champion -6)."""
    values = {
        "metric": METRIC,
        "value": -5.0,
        "merged": -5.0001,
        "p_value": 0.001,
        "validation_success": True,
        "coverage_passed": True,
        "version": "7",
    }
    return Candidate(**{**values, **changes})


def champion(value: float = -6.0, metric: str = METRIC, version: str = "3") -> Champion:
    return Champion(version=version, metric=metric, value=value)


def reason_for(verdict, gate: str) -> str:
    (line,) = [r for r in verdict.reasons if r.split(" ")[1] == f"{gate}:"]
    return line


def test_good_candidate_passes_every_gate_with_one_reason_each_in_order():
    verdict = should_promote(good(), BASE, champion(), GATES)
    assert verdict.promote
    assert [r.split(" ")[1].rstrip(":") for r in verdict.reasons] == GATE_ORDER
    assert all(r.startswith("PASS ") for r in verdict.reasons)
    assert verdict.failed == []


# (gate, candidate changes, base, champion changes, gates changes) that make exactly that gate fail.
FAILING = [
    ("min_value", {"value": -10.5, "merged": -10.5}, -20.0, {"value": -11.0}, {}),
    ("min_uplift", {}, -5.3, {}, {}),  # uplift 0.3 <= 0.5
    ("min_uplift", {}, -5.0, {}, {"min_uplift": 0.0}),  # no uplift at all: 0 is not > 0
    ("max_p_value", {"p_value": 0.2}, BASE, {}, {}),
    ("max_p_value", {"p_value": 0.01}, BASE, {}, {}),  # the bound itself is not significant enough
    ("max_p_value", {"p_value": None}, BASE, {}, {}),
    ("champion_margin", {}, BASE, {"value": -5.1}, {}),  # better by 0.1 <= margin 0.2
    ("max_merged_vs_adapter_rel", {"merged": -5.2}, BASE, {}, {}),  # 4% off
    ("max_merged_vs_adapter_rel", {"merged": None}, BASE, {}, {}),
    ("validation", {"validation_success": False}, BASE, {}, {}),
    ("validation", {"validation_success": None}, BASE, {}, {}),
    ("coverage", {"coverage_passed": False}, BASE, {}, {}),
    ("coverage", {"coverage_passed": None}, BASE, {}, {}),
]


@pytest.mark.parametrize(("gate", "changes", "base", "champion_changes", "gate_changes"), FAILING)
def test_each_gate_fails_alone_and_blocks_promotion(gate, changes, base, champion_changes, gate_changes):
    gates = PromoteConfig(**{**GATES.__dict__, **gate_changes})
    verdict = should_promote(good(**changes), base, champion(**champion_changes), gates)
    assert not verdict.promote
    assert [r.split(" ")[1].rstrip(":") for r in verdict.failed] == [gate]
    assert reason_for(verdict, gate).startswith(f"FAIL {gate}: ")


def test_worse_than_champion_beyond_tolerance_fails_both_champion_gates():
    verdict = should_promote(good(value=-5.0, merged=-5.0), BASE, champion(value=-4.8), GATES)
    assert not verdict.promote
    assert "FAIL champion_tolerance" in reason_for(verdict, "champion_tolerance")
    assert "FAIL champion_margin" in reason_for(verdict, "champion_margin")


def test_within_tolerance_but_not_beating_the_margin_keeps_the_champion():
    verdict = should_promote(good(value=-5.0), BASE, champion(value=-4.95), GATES)
    assert reason_for(verdict, "champion_tolerance").startswith("PASS")
    assert reason_for(verdict, "champion_margin").startswith("FAIL")
    assert not verdict.promote


def test_a_tie_with_the_champion_does_not_replace_it_even_with_zero_margin():
    gates = PromoteConfig(**{**GATES.__dict__, "champion_tolerance": 0.0, "champion_margin": 0.0})
    verdict = should_promote(good(value=-6.0, merged=-6.0), -9.0, champion(value=-6.0), gates)
    assert reason_for(verdict, "champion_tolerance").startswith("PASS")
    assert reason_for(verdict, "champion_margin") == (
        f"FAIL champion_margin: {METRIC} -6 vs champion v3 -6: delta 0 <= 0"
    )
    assert not verdict.promote


def test_beating_the_champion_by_more_than_the_margin_passes():
    verdict = should_promote(good(value=-5.0), BASE, champion(value=-5.25), GATES)
    assert reason_for(verdict, "champion_margin").startswith("PASS")
    assert verdict.promote


def test_first_promotion_without_champion_passes_champion_gates():
    verdict = should_promote(good(), BASE, None, GATES)
    assert verdict.promote
    assert reason_for(verdict, "champion_margin") == "PASS champion_margin: no champion yet (first promotion)"


def test_first_promotion_still_needs_the_other_gates():
    verdict = should_promote(good(p_value=0.5), BASE, None, GATES)
    assert not verdict.promote
    assert [r.split(" ")[1] for r in verdict.failed] == ["max_p_value:"]


def test_candidate_that_is_already_champion_is_not_compared_with_itself():
    verdict = should_promote(good(version="3"), BASE, champion(version="3", value=-5.0), GATES)
    assert verdict.promote
    assert "is the current champion (v3)" in reason_for(verdict, "champion_margin")


def test_champion_on_another_metric_cannot_be_compared():
    verdict = should_promote(good(), BASE, champion(metric="medmcqa_chat/acc", value=0.3), GATES)
    assert not verdict.promote
    assert "promoted on medmcqa_chat/acc" in reason_for(verdict, "champion_tolerance")


def test_min_value_none_means_no_floor():
    gates = PromoteConfig(**{**GATES.__dict__, "min_value": None})
    verdict = should_promote(good(value=-1e6, merged=-1e6), -2e6, None, gates)
    assert reason_for(verdict, "min_value").startswith("PASS min_value: no floor set")


def test_min_value_is_inclusive():
    gates = PromoteConfig(**{**GATES.__dict__, "min_value": -5.0})
    assert reason_for(should_promote(good(), BASE, None, gates), "min_value").startswith("PASS")


def test_verdicts_not_required_pass_but_say_what_they_were():
    gates = PromoteConfig(**{**GATES.__dict__, "require_validation": False, "require_coverage": False})
    verdict = should_promote(good(validation_success=False, coverage_passed=None), BASE, champion(), gates)
    assert verdict.promote
    assert reason_for(verdict, "validation") == "PASS validation: not required (data validation failed)"
    assert reason_for(verdict, "coverage") == "PASS coverage: not required (LoRA coverage gate missing)"


def test_nan_metric_fails_instead_of_promoting():
    nan = float("nan")
    verdict = should_promote(good(value=nan, merged=nan, p_value=nan), BASE, champion(), GATES)
    assert not verdict.promote
    failed = {r.split(" ")[1].rstrip(":") for r in verdict.failed}
    assert {"min_value", "min_uplift", "max_p_value", "champion_tolerance", "max_merged_vs_adapter_rel"} <= failed


def test_reason_texts_carry_the_numbers():
    verdict = should_promote(good(p_value=0.2), -5.8, None, GATES)
    assert reason_for(verdict, "min_uplift") == "PASS min_uplift: uplift 0.8 (adapter -5 - base -5.8) > 0.5"
    assert reason_for(verdict, "max_p_value") == "FAIL max_p_value: p-value 0.2 >= 0.01"


def test_merged_relative_difference_handles_zero_and_missing():
    assert merged_relative_difference(good(value=0.0, merged=0.0)) == 0.0
    assert math.isinf(merged_relative_difference(good(value=0.0, merged=0.1)))
    assert math.isinf(merged_relative_difference(good(merged=None)))
    assert merged_relative_difference(good(value=-4.0, merged=-4.2)) == pytest.approx(0.05)


def test_gate_round_trips_through_version_tags():
    gate = {
        "metric": METRIC,
        "base": -8.0,
        "adapter": -5.0,
        "merged": -5.00001,
        "uplift": 3.0,
        "p_value": 1e-9,
        "merged_vs_adapter": 1e-5,
    }
    tags = EvalGate.from_dict({**gate, "test": "wilcoxon_signed_rank", "n_paired": 8}).tags()
    assert all(isinstance(value, str) for value in tags.values())
    candidate, base = candidate_from_gate(EvalGate.from_tags(tags), "True", "False", version="4")
    assert (candidate.value, base, candidate.merged, candidate.p_value) == (-5.0, -8.0, -5.00001, 1e-9)
    assert (candidate.validation_success, candidate.coverage_passed, candidate.version) == (True, False, "4")
    assert champion_from_tags("4", tags) == Champion(version="4", metric=METRIC, value=-5.0)


def test_gate_with_missing_p_value_and_merged_reads_as_none():
    tags = {"gate.metric": "m", "gate.base": "0", "gate.adapter": "1", "gate.merged": "None"}
    candidate, _ = candidate_from_gate(EvalGate.from_tags(tags), True, True)
    assert candidate.p_value is None and candidate.merged is None


def test_incomplete_gate_or_champion_tags_fail_clearly():
    with pytest.raises(ValueError, match="'adapter'"):
        candidate_from_gate(EvalGate.from_tags({"gate.metric": METRIC, "gate.base": "1.0"}), True, True)
    with pytest.raises(ValueError, match=r"champion v2 has no gate\.metric"):
        champion_from_tags("2", {"git_commit": "abc"})
