"""DVC remotes: the snapshot and stage outputs round-trip through a remote (a local directory stands in for S3)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DVC = [sys.executable, "-m", "dvc"]


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "ci@example.com"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run([*DVC, "init", "-q"], repo)
    return repo


def test_push_then_pull_restores_the_snapshot_bit_for_bit(dvc_repo: Path, tmp_path: Path):
    data = dvc_repo / "data" / "medmcqa"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"id": "a", "question": "Which drug causes cinchonism?"}\n')
    (data / "manifest.json").write_text('{"source": "synthetic"}\n')
    remote = tmp_path / "remote"
    run([*DVC, "add", "-q", "data"], dvc_repo)
    # The same commands configure an S3-compatible remote: `dvc remote add -d storage s3://bucket/medlora`
    # plus `dvc remote modify storage endpointurl https://minio.example:9000` (see README).
    run([*DVC, "remote", "add", "-d", "storage", str(remote)], dvc_repo)
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "snapshot"], dvc_repo)
    pushed = run([*DVC, "push"], dvc_repo)
    assert "pushed" in pushed.lower() or "2 files" in pushed.lower()
    assert any(p.is_file() for p in remote.rglob("*")), "nothing reached the remote"

    original = {p.name: p.read_bytes() for p in data.iterdir()}
    shutil.rmtree(dvc_repo / "data")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    assert "not in cache" in run([*DVC, "status"], dvc_repo)

    run([*DVC, "pull"], dvc_repo)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == original
    assert "up to date" in run([*DVC, "status"], dvc_repo).lower()


def test_pull_from_an_empty_remote_fails_and_names_what_is_missing(dvc_repo: Path, tmp_path: Path):
    (dvc_repo / "data").mkdir()
    (dvc_repo / "data" / "rows.jsonl").write_text("{}\n")
    run([*DVC, "add", "-q", "data"], dvc_repo)
    run([*DVC, "remote", "add", "-d", "storage", str(tmp_path / "empty-remote")], dvc_repo)
    shutil.rmtree(dvc_repo / "data")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    result = subprocess.run([*DVC, "pull"], cwd=dvc_repo, capture_output=True, text=True)
    assert result.returncode != 0
    assert "data" in (result.stdout + result.stderr)
