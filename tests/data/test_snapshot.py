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
from medlora.core.config import SnapshotConfig
from medlora.core.contracts import COLUMNS, SPLITS
from medlora.core.hub import HubUnavailable
from medlora.data.schema import read_jsonl_rows
from medlora.data.snapshot import (
    normalize_hub_rows,
    read_original,
    read_source,
    restore,
    write_snapshot,
)

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


def test_original_rejects_bad_cop_and_missing_files(tmp_path):
    directory = original_dir(tmp_path)
    row = {**example_rows(1)[0], "id": "bad-cop-row", "cop": 0}
    (directory / "dev.json").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"dev\.json: row 'bad-cop-row': cop 0 is not 1-4"):
        read_original(directory)
    (directory / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing test\.json"):
        read_original(directory)
    with pytest.raises(ValueError, match="needs --path"):
        read_source("original", SnapshotConfig())


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
