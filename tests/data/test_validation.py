"""The validate stage: every rule both ways, parse failures, conservation of rows, contamination, fail vs quarantine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, example_rows
from medlora.core.config import Params, PathsConfig, ValidateConfig
from medlora.core.contracts import COLUMNS, SPLITS, ValidationReport
from medlora.core.io import write_jsonl
from medlora.data.schema import SnapshotParseError
from medlora.data.validation import RULES, ValidationFailed, check_splits, normalize_question
from medlora.data.validation import run as validate

IMG = '<img style="max-width: 100%" src=" />'


def clean_splits() -> dict[str, list[dict]]:
    """Valid rows: train, validation and test with distinct ids and distinct questions."""
    rows = example_rows(60)
    for i, row in enumerate(rows):
        row["question"] = f"Question number {i}: {row['question']}"
    test = [{**row, "cop": -1, "exp": ""} for row in rows[50:]]
    return {"train": rows[:40], "validation": rows[40:50], "test": test}


def edit(row: dict, **changes) -> dict:
    return {**row, **changes}


# (split, row index, changes, expected rules): one bad row per case, so a rule that fires on the wrong row shows.
FLAGGED = [
    ("train", 0, {"cop": "2"}, {"schema_types"}),
    ("train", 18, {"cop": True}, {"schema_types"}),  # a bool is an int to Python, not a label
    ("train", 19, {"cop": 1.0}, {"schema_types"}),
    ("train", 1, {"question": 12345}, {"schema_types"}),
    ("train", 2, {"opb": None}, {"not_null"}),
    ("train", 3, {"subject_name": None}, {"not_null"}),
    ("train", 4, {"cop": 4}, {"cop_in_range"}),
    ("validation", 0, {"cop": -1}, {"cop_in_range"}),
    ("train", 5, {"choice_type": "both"}, {"choice_type_in_set"}),
    ("train", 6, {"opc": "  \n "}, {"options_non_empty"}),
    ("train", 7, {"opd": "x" * 501}, {"option_length"}),
    ("train", 8, {"question": "Why?"}, {"question_length"}),
    ("train", 9, {"question": "x" * 2001}, {"question_length"}),
    ("train", 10, {"question": "          "}, {"question_length"}),
    ("train", 11, {"opa": IMG}, {"img_placeholder"}),
    ("train", 12, {"question": f"These ECG changes are seen in {IMG}"}, {"img_placeholder"}),
    ("test", 0, {"opb": " <IMG src='x.png'> "}, {"img_placeholder"}),
    ("train", 13, {"id": "same-id"}, {"id_unique"}),
    ("train", 14, {"id": "same-id"}, {"id_unique"}),
    ("train", 15, {"id": "fixture-0041"}, {"id_unique_across_splits"}),  # validation row 1's id
    ("test", 1, {"id": "fixture-0042"}, {"id_unique_across_splits"}),  # validation row 2's id
    # An exact copy is also a normalized copy: both rules count it.
    (
        "train",
        16,
        {"question": clean_splits()["validation"][3]["question"]},
        {"contamination_exact", "contamination_normalized"},
    ),
]
# Real MedMCQA quirks that are NOT errors.
KEPT = [
    ("train", 20, {"exp": None, "topic_name": None}),
    ("train", 21, {"opb": "Quinine", "opa": "Quinine"}),  # a repeated option
    ("train", 22, {"question": "Which aery supplies\nthe hea?\tChoose one"}),  # lost "rt", newline, tab
    ("train", 23, {"exp": "See <a href='x'>this</a></li>", "opa": "A <b>bold</b> option"}),  # other HTML
    ("train", 24, {"opc": f"See figure {IMG}"}),  # an option with text besides the image
    ("train", 25, {"question": "Mode?"}),  # exactly question_min_chars
    ("train", 26, {"question": "Temperature of 37 °C – μg dose?", "choice_type": "multi"}),
    ("test", 2, {}),  # cop -1 is allowed on the unlabeled test split
]


@pytest.fixture(scope="module")
def judged() -> tuple[dict[str, list[dict]], dict]:
    splits = clean_splits()
    for split, index, changes, _ in FLAGGED:
        splits[split][index] = edit(splits[split][index], **changes)
    for split, index, changes in KEPT:
        splits[split][index] = edit(splits[split][index], **changes)
    # Normalized contamination: same words, other case, spacing and punctuation.
    question = splits["validation"][4]["question"]
    splits["train"][17] = edit(splits["train"][17], question="  " + question.upper().replace(":", " ;").rstrip("?"))
    return splits, check_splits(splits, ValidateConfig())


def rules_of(reasons: list[str]) -> set[str]:
    return {reason.split(":")[0] for reason in reasons}


def test_clean_snapshot_flags_nothing():
    assert check_splits(clean_splits(), ValidateConfig()) == {split: {} for split in SPLITS}


@pytest.mark.parametrize(("split", "index", "changes", "expected"), FLAGGED, ids=[str(c[2])[:40] for c in FLAGGED])
def test_each_rule_flags_its_row(judged, split, index, changes, expected):
    _, flagged = judged
    assert rules_of(flagged[split].get(index, [])) == expected


@pytest.mark.parametrize(("split", "index", "changes"), KEPT, ids=[str(c[2])[:40] for c in KEPT])
def test_real_medmcqa_quirks_are_not_errors(judged, split, index, changes):
    _, flagged = judged
    assert index not in flagged[split], flagged[split].get(index)


def test_contamination_flags_the_train_copy_only(judged):
    splits, flagged = judged
    assert rules_of(flagged["train"][17]) == {"contamination_normalized"}
    assert rules_of(flagged["train"][16]) == {"contamination_exact", "contamination_normalized"}
    assert 3 not in flagged["validation"] and 4 not in flagged["validation"]
    assert normalize_question(splits["train"][17]["question"]) == normalize_question(
        splits["validation"][4]["question"]
    )


def test_nothing_else_is_flagged(judged):
    _, flagged = judged
    expected = {(split, index) for split, index, _, _ in FLAGGED} | {("train", 17)}
    assert {(split, index) for split in SPLITS for index in flagged[split]} == expected


def make_project(tmp_path: Path, splits: dict[str, list[dict]], on_error: str = "quarantine") -> Params:
    data = tmp_path / "data" / "medmcqa"
    for split, rows in splits.items():
        write_jsonl(data / f"{split}.jsonl", rows)
    paths = PathsConfig(
        data_dir=str(data),
        reports_dir=str(tmp_path / "reports"),
        validated_dir=str(tmp_path / "outputs/validated"),
        quarantine_dir=str(tmp_path / "outputs/quarantine"),
    )
    return Params(paths=paths, validate=ValidateConfig(on_error=on_error))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_quarantine_conserves_rows_and_writes_reasons(tmp_path, judged):
    splits, _ = judged
    params = make_project(tmp_path, splits)
    report = validate(params)
    report.write(tmp_path / "reports")
    assert ValidationReport.read(tmp_path / "reports") == report  # the file round-trips every key
    assert report.success is True and report.clean is False
    for split in SPLITS:
        counts = report.splits[split]
        kept = read_lines(tmp_path / "outputs/validated" / f"{split}.jsonl")
        quarantined = read_lines(tmp_path / "outputs/quarantine" / f"{split}.jsonl")
        assert counts["rows_in"] == len(splits[split]) == counts["rows_kept"] + counts["rows_quarantined"]
        assert (len(kept), len(quarantined)) == (counts["rows_kept"], counts["rows_quarantined"])
        assert all(list(row) == list(COLUMNS) for row in kept)
        assert all(row["reasons"] and ":" in row["reasons"][0] for row in quarantined)
    assert report.rows_in == report.rows_kept + report.rows_quarantined == 60
    assert set(report.rules) == set(RULES)
    assert report.rules["id_unique"]["count"] == 2 and report.rules["id_unique"]["ids"] == ["same-id"] * 2
    assert report.rules["contamination_normalized"]["splits"] == {"train": 2}
    assert report.rules["img_placeholder"]["splits"] == {"train": 2, "test": 1}


def test_fail_mode_stops_and_writes_only_the_report(tmp_path, judged):
    splits, _ = judged
    params = make_project(tmp_path, splits, on_error="fail")
    with pytest.raises(ValidationFailed, match=r"img_placeholder: 3 rows, e\.g\.") as caught:
        validate(params)
    report = caught.value.report  # run_stage writes it (tests/core/test_stage.py)
    assert report.success is False and report.on_error == "fail"
    assert report.splits["train"]["rows_in"] == 40
    assert not (tmp_path / "outputs/validated").exists()


def test_fail_mode_passes_a_clean_snapshot(tmp_path):
    params = make_project(tmp_path, clean_splits(), on_error="fail")
    report = validate(params)
    assert report.success and report.clean and report.rows_quarantined == 0
    assert len(read_lines(tmp_path / "outputs/validated/train.jsonl")) == 40
    assert (tmp_path / "outputs/quarantine/train.jsonl").read_text() == ""


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b'{"id": "a", "question": "Trunc', 2, "not valid JSON"),
        (b'{"id": "caf\xe9"}', 2, "not UTF-8"),
        (json.dumps({c: "x" for c in COLUMNS if c != "opc"}).encode(), 2, "missing column(s) opc"),
        (b"", None, "file is empty"),
    ],
    ids=["truncated-json", "non-utf8", "missing-column", "empty-file"],
)
def test_unparseable_file_stops_naming_file_line_problem(tmp_path, content, line, problem):
    params = make_project(tmp_path, clean_splits())
    path = Path(params.paths.data_dir) / "validation.jsonl"
    first = path.read_bytes().split(b"\n")[0]
    path.write_bytes(content if line is None else first + b"\n" + content + b"\n")
    with pytest.raises(SnapshotParseError) as caught:
        validate(params)
    assert (caught.value.path, caught.value.line) == (str(path), line)
    assert problem in caught.value.problem
    assert not (tmp_path / "reports/validation.json").exists()


def test_missing_split_file_is_named(tmp_path):
    params = make_project(tmp_path, clean_splits())
    (Path(params.paths.data_dir) / "test.jsonl").unlink()
    with pytest.raises(SnapshotParseError, match=r"test\.jsonl: file is missing"):
        validate(params)


def test_stage_script_exits_nonzero_naming_the_bad_line(tmp_path):
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    data = tmp_path / params["paths"]["data_dir"]
    for split, rows in clean_splits().items():
        write_jsonl(data / f"{split}.jsonl", rows)
    with (data / "train.jsonl").open("a") as handle:
        handle.write('{"id": "half a row"\n')
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pipelines/validate.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "data/medmcqa/train.jsonl:41: not valid JSON" in result.stderr


@pytest.mark.shared
def test_real_medmcqa_rows_judged(tmp_path, shared_medmcqa):
    """Real rows: only the <img> placeholders (10 train rows) are errors; their other quirks are kept."""
    data = tmp_path / "data" / "medmcqa"
    data.mkdir(parents=True)
    shutil.copy(shared_medmcqa / "train_sample.jsonl", data / "train.jsonl")
    shutil.copy(shared_medmcqa / "dev.jsonl", data / "validation.jsonl")
    shutil.copy(shared_medmcqa / "test_sample_unlabeled.jsonl", data / "test.jsonl")
    params = make_project(tmp_path, {})
    report = validate(params)
    counts = {split: (c["rows_in"], c["rows_kept"], c["rows_quarantined"]) for split, c in report.splits.items()}
    assert counts == {"train": (1861, 1851, 10), "validation": (4183, 4183, 0), "test": (83, 83, 0)}
    fired = {rule: entry["count"] for rule, entry in report.rules.items() if entry["count"]}
    assert fired == {"img_placeholder": 10}
    kept = read_lines(tmp_path / "outputs/validated/validation.jsonl")
    assert sum(row["exp"] is None for row in kept) == 1977  # null exp is not an error
    assert sum("\n" in row["question"] for row in kept) == 124  # nor are newlines
