"""benchmarks/data_throughput.py at 200 rows: validate + format stage scripts on a synthetic snapshot."""

from __future__ import annotations

ROWS = 200


def test_data_throughput_smoke(run_benchmark, tmp_path):
    project = tmp_path / "project"
    figures, table = run_benchmark("data_throughput", "--smoke", "--rows", str(ROWS), "--keep", str(project))

    assert figures["rows"] == ROWS
    splits = figures["splits"]
    assert sum(splits.values()) == ROWS and min(splits.values()) >= 1
    assert splits["train"] > splits["test"] > 0 and splits["train"] > splits["validation"] > 0  # MedMCQA's shape

    validate, formatted = figures["validate"], figures["format"]
    assert validate["rows_in"] == ROWS
    assert validate["rows_kept"] + validate["rows_quarantined"] == ROWS
    assert validate["rows_kept"] > 0.9 * ROWS  # the synthetic source is clean
    # The format stage reads the kept train rows only, and carves the early-stopping slice from them.
    assert 0 < formatted["rows_in"] <= splits["train"]
    assert formatted["rows_kept"] + formatted["rows_dropped"] <= formatted["rows_in"]
    assert formatted["train_rows"] + formatted["early_stop_rows"] == formatted["rows_kept"]
    assert formatted["train_rows"] > 0 and formatted["early_stop_rows"] > 0
    assert set(formatted["output_sha256"]) == {"train.jsonl", "early_stop.jsonl"}
    assert all(len(digest) == 64 for digest in formatted["output_sha256"].values())

    for stage in (validate, formatted):
        assert stage["seconds"] > 0 and stage["rows_per_s"] > 0 and stage["peak_rss_mb"] > 0
    assert figures["seconds"] == round(validate["seconds"] + formatted["seconds"], 2)
    assert figures["rows_per_s"] > 0
    assert figures["peak_rss_mb"] == max(validate["peak_rss_mb"], formatted["peak_rss_mb"])
    assert figures["target_met"] is None  # the targets are for the full size only

    assert any(line.startswith("validate") for line in table) and any(line.startswith("format") for line in table)
    # The stages ran in the kept project, not in the repository.
    assert (project / "reports" / "validation.json").is_file() and (project / "reports" / "format.json").is_file()
    assert (project / "outputs" / "formatted" / "train.jsonl").is_file()
