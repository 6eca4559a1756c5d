"""benchmarks/train_throughput.py for 2 steps of batch 4: the three batchings train in lockstep."""

from __future__ import annotations

STEPS, EVAL_ROWS, BATCH = 2, 4, 4
WAYS = ("pad_to_max", "trl_default", "project")


def test_train_throughput_smoke(run_benchmark, tmp_path):
    figures, table = run_benchmark(
        "train_throughput",
        "--smoke",
        "--steps",
        str(STEPS),
        "--eval-rows",
        str(EVAL_ROWS),
        "--batch-size",
        str(BATCH),
        "--source",
        "stored",
        "--keep",
        str(tmp_path / "work"),
    )

    assert figures["steps"] == STEPS and figures["batch_size"] == BATCH and figures["source"] == "stored"
    assert figures["train_examples"] == STEPS * BATCH and figures["heldout_examples"] == EVAL_ROWS
    assert "length-grouped" in figures["project_batching"]  # what the train stage does on a CPU
    ways = figures["ways"]
    assert set(ways) == set(WAYS)
    for way, r in ways.items():
        assert r["steps"] == STEPS, way
        assert r["seconds"] > 0 and r["median_step_s"] > 0 and r["real_tokens_per_s"] > 0, way
        assert 0 < r["real_tokens"] <= r["padded_tokens"], way
        assert r["heldout_loss"] > 0 and r["last_train_loss"] > 0, way
    # One epoch each: every way trains on the same examples, so on the same real tokens; only the padding differs.
    assert len({r["real_tokens"] for r in ways.values()}) == 1
    assert ways["pad_to_max"]["padded_tokens"] == STEPS * BATCH * figures["max_length"]
    assert ways["pad_to_max"]["padded_tokens"] > max(
        ways["trl_default"]["padded_tokens"], ways["project"]["padded_tokens"]
    )
    assert figures["ratio_vs_pad_to_max"] > 0 and figures["ratio_vs_trl_default"] > 0
    assert abs(figures["loss_rel_diff"]) < 0.5
    assert figures["heldout_loss_initial"] > 0
    assert table[0].startswith("source stored") and any(line.startswith("project") for line in table)
