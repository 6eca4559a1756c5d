"""`should_promote`: every gate both ways, the first promotion, ties, NaN, like-with-like champion comparison, and the
tag round trip."""

from __future__ import annotations

import math

import pytest

from medlora.core.config import PromoteConfig
from medlora.core.contracts import EvalGate
from medlora.registry.gates import (
    Candidate,
    Champion,
    EvalSet,
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
SYNTHETIC = EvalSet(validation_sha256="5" * 64, limit=None, source="local")  # what good() and champion() share
REAL = EvalSet(validation_sha256="e" * 64, limit=None, source="local")
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
        "evaluated_on": SYNTHETIC,
    }
    return Candidate(**{**values, **changes})


def champion(
    value: float = -6.0, metric: str = METRIC, version: str = "3", evaluated_on: EvalSet | None = SYNTHETIC
) -> Champion:
    return Champion(version=version, metric=metric, value=value, evaluated_on=evaluated_on)


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


# (candidate's evaluation set, champion's, words the reason must contain): never compared, whatever the values.
NOT_COMPARABLE = [
    (REAL, SYNTHETIC, f"validation data sha256 {'e' * 12} vs champion's {'5' * 12}"),
    (EvalSet("5" * 64, limit=100, source="local"), SYNTHETIC, "question limit 100 vs champion's None"),
    (EvalSet("5" * 64, limit=None, source="hub"), SYNTHETIC, "data source hub vs champion's local"),
    (None, SYNTHETIC, "the candidate's evaluation data is not recorded"),
    (SYNTHETIC, None, "the champion v3's evaluation data is not recorded"),  # registered before it was recorded
    (EvalSet(None), SYNTHETIC, "the candidate's validation data hash is not recorded"),
    (SYNTHETIC, EvalSet(None), "the champion v3's validation data hash is not recorded"),
    (None, None, "the candidate's evaluation data is not recorded"),  # two unknowns are not equal either
]


@pytest.mark.parametrize("champion_value", [-6.0, -1.0, -5.0])  # worse, better and equal: the values never matter
@pytest.mark.parametrize(("mine", "theirs", "words"), NOT_COMPARABLE)
def test_a_champion_scored_on_other_data_is_not_compared_and_both_champion_gates_fail(
    mine, theirs, words, champion_value
):
    verdict = should_promote(good(evaluated_on=mine), BASE, champion(value=champion_value, evaluated_on=theirs), GATES)
    assert not verdict.promote
    assert [r.split(" ")[1].rstrip(":") for r in verdict.failed] == ["champion_tolerance", "champion_margin"]
    for gate in ("champion_tolerance", "champion_margin"):
        line = reason_for(verdict, gate)
        assert line.startswith(f"FAIL {gate}: not comparable with champion v3: ")
        assert words in line
        assert "medlora promote VERSION --force --reason" in line  # the README's rule: a person decides
        assert "delta" not in line  # no number was compared


def test_every_difference_is_named_at_once():
    theirs = EvalSet("5" * 64, limit=200, source="hub")
    verdict = should_promote(
        good(evaluated_on=REAL), BASE, champion(metric="medmcqa_chat/acc", evaluated_on=theirs), GATES
    )
    line = reason_for(verdict, "champion_margin")
    for words in ("promoted on medmcqa_chat/acc", "validation data sha256", "question limit None vs champion's 200",
                  "data source local vs champion's hub"):  # fmt: skip
        assert words in line


def test_the_same_data_is_compared_by_value():
    same = EvalSet(validation_sha256="e" * 64, limit=100, source="hub")
    verdict = should_promote(good(evaluated_on=same), BASE, champion(evaluated_on=EvalSet("e" * 64, 100, "hub")), GATES)
    assert verdict.promote
    assert reason_for(verdict, "champion_margin").startswith(f"PASS champion_margin: {METRIC} -5 vs champion v3 -6")


@pytest.mark.parametrize("mine", [REAL, None, EvalSet(None)])
def test_without_a_champion_or_against_itself_the_data_does_not_matter(mine):
    assert should_promote(good(evaluated_on=mine), BASE, None, GATES).promote
    itself = should_promote(good(version="3", evaluated_on=mine), BASE, champion(version="3"), GATES)
    assert itself.promote
    assert "is the current champion (v3)" in reason_for(itself, "champion_tolerance")


def test_other_gates_still_run_when_the_champion_is_not_comparable():
    verdict = should_promote(good(evaluated_on=REAL, p_value=0.5), BASE, champion(), GATES)
    failed = [r.split(" ")[1].rstrip(":") for r in verdict.failed]
    assert failed == ["max_p_value", "champion_tolerance", "champion_margin"]


def test_evaluation_set_round_trips_through_version_tags():
    for evaluated_on in (REAL, EvalSet("a" * 64, limit=100, source="hub"), EvalSet("b" * 64)):
        tags = evaluated_on.tags()
        assert all(isinstance(value, str) and key.startswith("eval.") for key, value in tags.items())
        assert EvalSet.from_tags(tags) == evaluated_on
    assert EvalSet.from_tags({"gate.metric": METRIC}) is None  # a version registered before it was recorded
    assert EvalSet.from_tags({"eval.validation_sha256": "None"}) is None
    gate_tags = {"gate.metric": METRIC, "gate.adapter": "-5.0", **REAL.tags()}
    assert champion_from_tags("4", gate_tags).evaluated_on == REAL
    assert champion_from_tags("4", {"gate.metric": METRIC, "gate.adapter": "-5.0"}).evaluated_on is None


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
    candidate, base = candidate_from_gate(EvalGate.from_tags(tags), "True", "False", version="4", evaluated_on=REAL)
    assert (candidate.value, base, candidate.merged, candidate.p_value) == (-5.0, -8.0, -5.00001, 1e-9)
    assert (candidate.validation_success, candidate.coverage_passed, candidate.version) == (True, False, "4")
    assert candidate.evaluated_on == REAL
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
