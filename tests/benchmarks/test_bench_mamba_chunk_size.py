"""benchmarks/mamba_chunk_size.py --smoke: every chunk size timed on the tiny model, same loss, one picked."""

from __future__ import annotations


def test_mamba_chunk_size_smoke(run_benchmark):
    from medlora.modeling.presets import tiny_nemotron_h_config

    figures, table = run_benchmark("mamba_chunk_size", "--smoke")

    sizes = figures["chunk_sizes"]
    assert sizes == [8, 16, 64] and figures["fastest"] in sizes
    assert (
        figures["configured"] == tiny_nemotron_h_config(2048, 0, 1, 3).chunk_size
    )  # the model it timed is the preset's
    assert figures["results_agree"] is True
    assert figures["loss_max_rel_diff"] < 1e-4 and figures["grad_norm_max_rel_diff"] < 1e-3
    assert figures["mamba_layers"] == 3 and figures["threads"] == 1
    for size in map(str, sizes):
        entry = figures["by_chunk_size"][size]
        assert 0 < entry["min_s"] <= entry["median_s"] and entry["max_length_median_s"] > 0
        assert entry["all_batches_s"] > 0 and entry["speedup_vs_configured"] > 0
    assert figures["by_chunk_size"][str(figures["configured"])]["speedup_vs_configured"] == 1.0
    fastest = figures["by_chunk_size"][str(figures["fastest"])]["all_batches_s"]
    assert fastest == min(figures["by_chunk_size"][s]["all_batches_s"] for s in map(str, sizes))
    assert figures["token_lengths"]["p50"] > 0 and figures["padded_widths"]["max_length"] == 64
    assert any("<- fastest" in line for line in table)


def test_tiny_preset_uses_the_benchmarked_chunk_size():
    """The full run (OMP_NUM_THREADS=1, batch 16, widths 79-153 and 256): 16 took 0.106-0.114 s a step against
    0.39-0.44 s at 64 (the old setting), tied with 8 on typical batches and 1.6x faster than it at 256 tokens."""
    from medlora.modeling.presets import tiny_nemotron_h_config

    assert tiny_nemotron_h_config(2048, 0, 1, 3).chunk_size == 16
