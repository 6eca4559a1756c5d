"""Paired significance of base against fine-tuned, on per-question values, and the `gate` object of eval.json.

Both models answer the same questions, so the tests are paired: McNemar (the exact binomial form) for 0/1 values
such as accuracy, the Wilcoxon signed-rank test for continuous ones such as answer log-likelihood. Both are
two-sided; the promotion gates separately require the uplift to be positive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from medlora.core.contracts import EvalGate

# Per-question values that are 0/1: McNemar. Anything else (log-likelihoods): Wilcoxon signed-rank.
BINARY_METRICS: frozenset[str] = frozenset({"acc", "acc_norm", "answer_greedy"})


def mcnemar_p_value(base: Sequence[float], adapter: Sequence[float]) -> float:
    """Exact McNemar test: two-sided binomial test of the discordant pairs against 1/2.

    `base` and `adapter` are 0/1 outcomes for the same questions in the same order. Pairs where both models agree
    carry no evidence; with no discordant pair at all the p-value is 1. Raises ValueError on unequal lengths.
    """
    from scipy.stats import binomtest

    pairs = _paired(base, adapter)
    base_only = sum(1 for b, a in pairs if b and not a)
    adapter_only = sum(1 for b, a in pairs if a and not b)
    if base_only + adapter_only == 0:
        return 1.0
    return float(binomtest(adapter_only, base_only + adapter_only, 0.5).pvalue)


def wilcoxon_p_value(base: Sequence[float], adapter: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank test on the per-question differences adapter - base.

    Zero differences are dropped (scipy's "wilcox" method); when every difference is zero the p-value is 1.
    Raises ValueError on unequal lengths.
    """
    from scipy.stats import wilcoxon

    differences = [a - b for b, a in _paired(base, adapter)]
    if not any(differences):
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_test(metric: str, base: Sequence[float], adapter: Sequence[float]) -> tuple[str, float]:
    """(test name, p-value) for `metric`'s per-question values: McNemar for 0/1 metrics, else Wilcoxon."""
    if metric in BINARY_METRICS:
        return "mcnemar_exact", mcnemar_p_value(base, adapter)
    return "wilcoxon_signed_rank", wilcoxon_p_value(base, adapter)


def build_gate(metric: str, values: Mapping[str, float], per_question: Mapping[str, Mapping[str, float]]) -> EvalGate:
    """The `gate` object of eval.json (the promotion gates read it).

    `metric` is "task/metric"; `values` maps model name (base, adapter, merged) to the harness's aggregate value;
    `per_question` maps model name to {question id: value}. Base and adapter are paired on the questions both
    answered. Missing models give None for what needs them.
    """
    base, adapter, merged = values.get("base"), values.get("adapter"), values.get("merged")
    test, p_value, n_paired = None, None, 0
    if "base" in per_question and "adapter" in per_question:
        shared = sorted(set(per_question["base"]) & set(per_question["adapter"]))
        base_values = [per_question["base"][key] for key in shared]
        adapter_values = [per_question["adapter"][key] for key in shared]
        if shared:
            test, p_value = paired_test(metric.rsplit("/", 1)[-1], base_values, adapter_values)
        n_paired = len(shared)
    return EvalGate(
        metric=metric,
        base=base,
        adapter=adapter,
        merged=merged,
        uplift=adapter - base if adapter is not None and base is not None else None,
        p_value=p_value,
        test=test,
        n_paired=n_paired,
        merged_vs_adapter=abs(merged - adapter) if merged is not None and adapter is not None else None,
    )


def _paired(base: Sequence[float], adapter: Sequence[float]) -> list[tuple[float, float]]:
    if len(base) != len(adapter):
        raise ValueError(f"paired test needs equal lengths, got {len(base)} base and {len(adapter)} adapter values")
    for value in (*base, *adapter):
        if math.isnan(value):
            raise ValueError("paired test got a NaN per-question value")
    return list(zip(base, adapter, strict=True))
