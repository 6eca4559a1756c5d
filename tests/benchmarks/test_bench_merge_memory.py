"""benchmarks/merge_memory.py on the tiny replica: a bf16 merge that passes parity and reports its peak memory."""

from __future__ import annotations


def test_merge_memory_smoke(run_benchmark):
    figures, table = run_benchmark("merge_memory", "--smoke")
    (tiny,) = figures["merge_memory"]
    assert tiny["size"] == "tiny" and tiny["success"] is True
    assert 0.5 < tiny["weights_mib"] < 2  # the tiny replica's bf16 shards
    assert tiny["merge_peak_mib"] >= tiny["baseline_peak_mib"] > 0 and tiny["seconds"] > 0
    assert table[0].split()[:2] == ["size", "weights"] and table[1].startswith("tiny")
