"""`medlora snapshot` / `medlora restore`: each source, the manifest, and a real git+DVC repo round trip."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, example_rows
from medlora import cli
from medlora.core.config import Params, PathsConfig, SnapshotConfig
from medlora.core.contracts import COLUMNS, SPLITS
from medlora.core.hub import HubUnavailable
from medlora.data.schema import SnapshotParseError, read_jsonl_rows
from medlora.data.snapshot import (
    normalize_hub_rows,
    read_original,
    read_source,
    restore,
    write_snapshot,
)
from medlora.data.validation import run as validate

SMALL = {"train_size": 120, "validation_size": 30, "test_size": 12}
DEV_JSONL_SHA256 = "2b85e43806bb0e9cf7519f1887bbab471bb062bdea1217c1d0cccc2ed22699ba"


def write_params(directory: Path, **snapshot: object) -> Path:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["snapshot"].update(snapshot)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def dvc(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *arguments], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A fresh git + DVC repository (no remote) holding a small synthetic snapshot made by `medlora snapshot`."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc("init", "-q", cwd=tmp_path).returncode == 0
    write_params(tmp_path, **SMALL)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["snapshot", "--source", "synthetic"]) == 0
    return tmp_path


def test_hub_rows_are_normalized_from_an_in_memory_dataset():
    import datasets

    rows = example_rows(6)
    shuffled = [{key: row[key] for key in reversed(COLUMNS)} for row in rows]  # the hub's own column order varies
    shuffled[5] = {**shuffled[5], "cop": -1, "exp": ""}
    dataset = datasets.Dataset.from_list(shuffled)
    normalized = normalize_hub_rows(dataset)
    assert [list(row) for row in normalized] == [list(COLUMNS)] * 6
    assert [row["cop"] for row in normalized] == [0, 1, 2, 3, 0, -1]
    assert all(type(row["cop"]) is int for row in normalized)
    assert normalized[0]["exp"] is None and normalized[1]["exp"] == rows[1]["exp"]


def test_hub_offline_fails_within_seconds_saying_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnavailable, match=r"HF_HUB_OFFLINE.*--source original --path DIR"):
        read_source("hub", SnapshotConfig(revision="abc"))
    assert time.perf_counter() - started < 5


def test_cli_hub_offline_exits_2_with_advice(tmp_path, monkeypatch, capsys):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["snapshot", "--source", "hub", "--no-dvc"]) == 2
    assert "--source synthetic" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def original_dir(tmp_path: Path, dev: Path | None = None) -> Path:
    """An original-release directory: cop 1-4, and a test.json without cop/exp."""
    directory = tmp_path / "original"
    directory.mkdir()
    rows = example_rows(8)
    with (directory / "train.json").open("w") as handle:
        for row in rows[:5]:
            handle.write(json.dumps({**row, "cop": row["cop"] + 1}) + "\n")
    with (directory / "test.json").open("w") as handle:
        for row in rows[5:]:
            handle.write(json.dumps({k: v for k, v in row.items() if k not in ("cop", "exp")}) + "\n")
    if dev is not None:
        shutil.copy(dev, directory / "dev.json")
    else:
        shutil.copy(directory / "train.json", directory / "dev.json")
    return directory


def test_original_release_is_normalized(tmp_path):
    splits, provenance = read_original(original_dir(tmp_path))
    rows = example_rows(8)
    assert [row["cop"] for row in splits["train"]] == [row["cop"] for row in rows[:5]]  # 1-4 back to 0-3
    assert [(row["cop"], row["exp"]) for row in splits["test"]] == [(-1, "")] * 3
    assert [list(row) for split in SPLITS for row in splits[split]] == [list(COLUMNS)] * 13
    assert set(provenance["inputs"]) == {"train.json", "dev.json", "test.json"}


def test_original_real_dev_split_matches_the_hub_file_byte_for_byte(tmp_path, shared_medmcqa):
    splits, _ = read_original(original_dir(tmp_path, dev=shared_medmcqa / "original" / "dev.json"))
    assert len(splits["validation"]) == 4183
    write_snapshot(splits, tmp_path / "data" / "medmcqa", {"source": "original"})
    written = (tmp_path / "data" / "medmcqa" / "validation.jsonl").read_bytes()
    # The same split in the hub's schema, published separately: normalizing must reproduce it exactly.
    assert hashlib.sha256(written).hexdigest() == DEV_JSONL_SHA256


def test_original_missing_files_and_path_are_refused(tmp_path):
    directory = original_dir(tmp_path)
    (directory / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing test\.json"):
        read_original(directory)
    with pytest.raises(ValueError, match="needs --path"):
        read_source("original", SnapshotConfig())


# ---- A malformed row reaches the validate stage (issue 11 item 12): quarantined under its rule, never an abort.


def distinct_rows(n: int) -> list[dict]:
    """Valid hub-schema rows with distinct ids and questions (no cross-split or contamination rule fires)."""
    rows = example_rows(n)
    for i, row in enumerate(rows):
        row["question"] = f"Question number {i}: {row['question']}"
    return rows


def write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def project_params(tmp_path: Path) -> Params:
    paths = PathsConfig(
        data_dir=str(tmp_path / "data" / "medmcqa"),
        reports_dir=str(tmp_path / "reports"),
        validated_dir=str(tmp_path / "outputs/validated"),
        quarantine_dir=str(tmp_path / "outputs/quarantine"),
    )
    return Params(paths=paths)


def quarantined_rules(params: Params) -> dict[str, dict[str, set[str]]]:
    """{split: {row id: rules}} from the validate stage's quarantine files."""
    out = {}
    for split in SPLITS:
        lines = (Path(params.paths.quarantine_dir) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        out[split] = {row["id"]: {reason.split(":")[0] for reason in row["reasons"]} for row in rows}
    return out


def assert_conserved(report, source_rows: dict[str, int]) -> None:
    for split, counts in report.splits.items():
        assert counts["rows_in"] == source_rows[split], split  # every source row reached validation
        assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]
    assert report.rows_in == sum(source_rows.values()) == report.rows_kept + report.rows_quarantined


def test_original_malformed_rows_are_quarantined_not_fatal(tmp_path):
    """One bad value per row, in every split of the original release format: the import goes through, and the
    validate stage quarantines exactly those rows, each under its rule, counting all of them."""
    rows = distinct_rows(30)
    train = [{**row, "cop": row["cop"] + 1} for row in rows[:20]]
    dev = [{**row, "cop": row["cop"] + 1} for row in rows[20:26]]
    test = [{k: v for k, v in row.items() if k not in ("cop", "exp")} for row in rows[26:]]
    train[0]["cop"] = 0  # 1-4 in this format: shifted to -1, outside 0-3
    train[1]["cop"] = "2"  # a string: kept as read
    train[2]["cop"] = True  # a bool is not a label
    train[3]["cop"] = 2.0
    del train[4]["question"]  # a missing field: null
    dev[0]["cop"] = 5
    test[0]["cop"] = 0  # would shift onto -1, which the test split accepts as "unlabeled": carried as null
    test[1]["cop"] = 4  # a labeled test row is fine
    directory = tmp_path / "original"
    directory.mkdir()
    for name, split_rows in (("train.json", train), ("dev.json", dev), ("test.json", test)):
        write_lines(directory / name, split_rows)

    splits, _ = read_original(directory)  # no ValueError: row quality is the validate stage's business
    assert [row["cop"] for row in splits["train"][:5]] == [-1, "2", True, 2.0, rows[4]["cop"]]
    assert splits["train"][4]["question"] is None and list(splits["train"][4]) == list(COLUMNS)
    assert (splits["validation"][0]["cop"], splits["test"][0]["cop"], splits["test"][1]["cop"]) == (4, None, 3)
    params = project_params(tmp_path)
    write_snapshot(splits, params.paths.data_dir, {"source": "original"})

    report = validate(params)
    assert_conserved(report, {"train": 20, "validation": 6, "test": 4})
    assert quarantined_rules(params) == {
        "train": {
            train[0]["id"]: {"cop_in_range"},
            train[1]["id"]: {"schema_types"},
            train[2]["id"]: {"schema_types"},
            train[3]["id"]: {"schema_types"},
            train[4]["id"]: {"not_null"},
        },
        "validation": {dev[0]["id"]: {"cop_in_range"}},
        "test": {test[0]["id"]: {"not_null"}},
    }
    assert report.rules["schema_types"]["count"] == 3 and report.rules["cop_in_range"]["splits"] == {
        "train": 1,
        "validation": 1,
    }


def test_original_file_that_cannot_be_parsed_stops_naming_file_and_line(tmp_path):
    directory = original_dir(tmp_path)
    with (directory / "train.json").open("a") as handle:
        handle.write('{"id": "half a row", "cop": \n')
    with pytest.raises(SnapshotParseError) as caught:
        read_original(directory)
    assert (caught.value.path, caught.value.line) == (str(directory / "train.json"), 6)
    assert "not valid JSON" in caught.value.problem


@pytest.mark.parametrize("container", ["dataset", "list"])
def test_hub_row_missing_a_field_is_quarantined_not_fatal(tmp_path, monkeypatch, container):
    """`medlora snapshot --source hub` end to end with an in-memory hub (a DatasetDict, or plain lists): a row
    missing `cop`, one missing `opa`, one whose `cop` is text; the snapshot holds every row, validate quarantines
    those three under their rules."""
    import datasets

    from medlora.data import snapshot

    rows = distinct_rows(30)
    hub = {"train": rows[:20], "validation": rows[20:26], "test": [{**r, "cop": -1, "exp": ""} for r in rows[26:]]}
    del hub["train"][3]["cop"]
    del hub["validation"][1]["opa"]
    hub["test"][2]["cop"] = "n/a"
    if container == "dataset":
        hub["test"][2]["cop"] = None  # a typed column cannot hold text: a null is what the hub would give
        loaded = datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in hub.items()})
    else:
        loaded = hub
    monkeypatch.setattr(snapshot, "ensure_hub_reachable", lambda *args, **kwargs: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, revision=None: loaded)
    params = project_params(tmp_path)
    manifest = snapshot.take_snapshot(params, source="hub", add=False)
    assert manifest["rows"] == {"train": 20, "validation": 6, "test": 4}

    report = validate(params)
    assert_conserved(report, manifest["rows"])
    test_rule = {"not_null"} if container == "dataset" else {"schema_types"}
    assert quarantined_rules(params) == {
        "train": {rows[3]["id"]: {"not_null"}},
        "validation": {rows[21]["id"]: {"not_null"}},
        "test": {rows[28]["id"]: test_rule},
    }


def test_manifest_records_counts_and_hashes(repo):
    manifest = json.loads((repo / "data/medmcqa/manifest.json").read_text())
    assert manifest["source"] == "synthetic" and manifest["params"]["seed"] == 1234
    assert manifest["rows"] == {"train": 120, "validation": 30, "test": 12}
    for split in SPLITS:
        path = repo / "data/medmcqa" / f"{split}.jsonl"
        assert manifest["sha256"][path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert len(read_jsonl_rows(path)) == manifest["rows"][split]


def test_snapshot_is_tracked_by_dvc_and_status_is_clean(repo):
    recorded = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert recorded["path"] == "data" and recorded["md5"].endswith(".dir") and recorded["nfiles"] == 4
    status = dvc("status", "--json", "data.dvc", cwd=repo)
    assert status.returncode == 0 and json.loads(status.stdout) == {}
    assert "/data" in (repo / ".gitignore").read_text()


def test_restore_from_cache_then_by_regeneration_keeps_data_dvc(repo):
    recorded = (repo / "data.dvc").read_bytes()
    original = {p.name: p.read_bytes() for p in (repo / "data/medmcqa").iterdir()}
    config = SnapshotConfig(**SMALL)
    assert restore(config, "data/medmcqa") == "clean"

    shutil.rmtree(repo / "data")
    assert restore(config, "data/medmcqa") == "checkout"

    # A fresh clone: no data, no DVC cache, no remote.
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert restore(config, "data/medmcqa") == "regenerated"
    assert (repo / "data.dvc").read_bytes() == recorded
    assert {p.name: p.read_bytes() for p in (repo / "data/medmcqa").iterdir()} == original
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


def test_restore_refuses_a_regeneration_that_does_not_match(repo):
    recorded = (repo / "data.dvc").read_bytes()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    changed = SnapshotConfig(**{**SMALL, "train_size": 121})
    with pytest.raises(RuntimeError, match=r"does not match data\.dvc \(md5 [0-9a-f]{32}\.dir\)"):
        restore(changed, "data/medmcqa")
    assert (repo / "data.dvc").read_bytes() == recorded
    with pytest.raises(RuntimeError, match="cannot be regenerated offline"):
        restore(SnapshotConfig(**{**SMALL, "source": "hub"}), "data/medmcqa")


def test_restore_without_data_dvc_says_to_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `medlora snapshot`"):
        restore(SnapshotConfig(), "data/medmcqa")


def test_restore_pulls_a_non_synthetic_snapshot_from_a_remote(repo, tmp_path):
    assert dvc("remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=repo).returncode == 0
    assert dvc("push", "data.dvc", cwd=repo).returncode == 0
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert restore(SnapshotConfig(**{**SMALL, "source": "hub"}), "data/medmcqa") == "pull"
    assert json.loads(dvc("status", "--json", "data.dvc", cwd=repo).stdout) == {}


def test_restore_repairs_the_rwlock_a_killed_dvc_left_half_written(tmp_path, monkeypatch):
    """DVC rewrites .dvc/tmp/rwlock in place; a SIGKILL mid-write makes every later dvc command fail."""
    from medlora.data.snapshot import repair_dvc_state, run_dvc

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    run_dvc("init", "-q")
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_text('{"write": {"outputs/adapter": {"pid": 1234')  # cut off by the kill
    failed = run_dvc("repro", check=False)
    assert failed.returncode != 0 and "RWLock-file" in failed.stdout + failed.stderr  # what the user would meet
    assert repair_dvc_state() == [str(Path(".dvc/tmp/rwlock"))]
    assert run_dvc("repro", check=False).returncode == 0 and (tmp_path / "out.txt").read_text() == "hi\n"
    rwlock.write_text('{"write": {}, "read": {}}')
    assert repair_dvc_state() == [] and rwlock.exists()  # a readable lock file is DVC's business
