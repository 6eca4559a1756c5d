"""MLflow as a shared service: the register and promote stages against `mlflow server` with a PostgreSQL backend
and a separate artifact store (MLFLOW_TRACKING_URI=http://...), checked through the server's REST API.

PostgreSQL comes from Debian's package (`scripts/ci_services.sh` installs it); the test skips when it is absent.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import wait_for_http_ok
from registry.test_register import (
    ADAPTER,
    MERGED,
    build_outputs,
    free_port,
    gate,
    pipeline_run,
    project_params,
    register_and_promote,
)

pytestmark = pytest.mark.slow

LINEAGE_TAGS = ("git_commit", "data_dvc_md5", "params_hash", "model_preset")


def postgres_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: `pg_config --bindir`, /usr/lib/postgresql/*/bin, PATH."""
    candidates = []
    if shutil.which("pg_config"):
        result = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(result.stdout.strip())
    # Debian names them by major version (/usr/lib/postgresql/15/bin): the newest first.
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: (len(p), p))
    candidates += reversed(versions)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def run_checked(command: list[str], **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def postgres_url(request) -> str:
    """A throwaway PostgreSQL on 127.0.0.1 (socket dir and data in a temp dir), stopped at the end even on failure.

    initdb refuses root, so as root every PostgreSQL command runs as the `postgres` system user.
    """
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl, postgres) not found: run scripts/ci_services.sh")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` system user to run initdb as")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="medlora-pg-"))
    if as_user:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()

    def stop() -> None:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"],
                           capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(stop)
    run_checked([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"])
    # fsync off: a throwaway database, and the 2 cores are shared with other tests.
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off"
    start = [str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data), "-l", str(root / "log"), "-o", options]
    run_checked([*as_user, *start])
    run_checked([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"])
    return f"postgresql://postgres@127.0.0.1:{port}/mlflow"


@pytest.fixture(scope="module")
def mlflow_server(request, postgres_url, tmp_path_factory) -> dict:
    """`mlflow server` over the PostgreSQL store, artifacts in their own temp dir; its process group dies at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    artifacts, log, port = root / "artifacts", root / "server.log", free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The server's job runner (7 huey consumers, for GenAI jobs) is not used by the registry: spare the 2 cores.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = ["mlflow", "server", "--backend-store-uri", postgres_url, "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        # The server forks uvicorn workers: end the whole group, not only the mlflow process.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=15)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    wait_for_http_ok(f"{url}/health", server, "mlflow server", log)
    print(f"mlflow server ready in {time.monotonic() - started:.1f} s")
    return {"url": url, "artifacts": artifacts, "database": postgres_url}


def rest(url: str, endpoint: str, **query: str) -> dict:
    """GET /api/2.0/mlflow/<endpoint>?<query> as JSON."""
    address = f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(address, timeout=30) as response:
        return json.loads(response.read())


def tags_of(entity: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in entity.get("tags", [])}


def test_register_and_promote_against_a_tracking_server_with_postgres(
    mlflow_server, tmp_path, monkeypatch, tiny_base_dir
):
    import mlflow
    import psycopg

    url = mlflow_server["url"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    params = project_params(tmp_path, tiny_base_dir)
    runs = [build_outputs(tiny_base_dir, tmp_path / f"run{seed}", seed) for seed in (1, 2)]

    run_id = pipeline_run(params, runs[0], gate(-5.0))
    registration, promotion = register_and_promote(params)
    assert registration.tracking_uri == url
    assert promotion.decision == "promoted"
    assert promotion.champion_after == {ADAPTER: "1", MERGED: "1"}
    # A worse second run is registered as challenger and rejected: the champion stays.
    second_run_id = pipeline_run(params, runs[1], gate(-9.0))
    _, rejected = register_and_promote(params)
    assert rejected.decision == "rejected"
    assert not (tmp_path / "mlruns").exists(), "a local store was used instead of the server"

    for name in (ADAPTER, MERGED):
        model = rest(url, "registered-models/get", name=name)["registered_model"]
        assert model["name"] == name
        assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": "1", "challenger": "2"}
        champion = rest(url, "registered-models/alias", name=name, alias="champion")["model_version"]
        assert (champion["version"], champion["run_id"]) == ("1", run_id)
        tags = tags_of(champion)
        assert all(tags.get(key) for key in LINEAGE_TAGS), f"{name} v1 lacks lineage tags: {sorted(tags)}"
        assert tags["params_hash"] == params.params_hash() and tags["model_preset"] == params.model.preset
        assert tags["mlflow_run_id"] == run_id and tags["gate.adapter"] == "-5.0"
        challenger = rest(url, "registered-models/alias", name=name, alias="challenger")["model_version"]
        assert challenger["run_id"] == second_run_id
    adapter_v1 = tags_of(rest(url, "registered-models/alias", name=ADAPTER, alias="champion")["model_version"])
    assert adapter_v1["merged_version"] == "1"

    # The registry lives in PostgreSQL, the weights in the artifact store, and they come back through the server.
    with psycopg.connect(mlflow_server["database"]) as connection:
        stored = connection.execute("SELECT name FROM registered_models").fetchall()
    assert {row[0] for row in stored} == {ADAPTER, MERGED}
    assert list(mlflow_server["artifacts"].rglob("MLmodel")), "no model reached the artifact store"
    reloaded = mlflow.pyfunc.load_model(f"models:/{ADAPTER}@champion").unwrap_python_model()
    with torch.no_grad():
        logits = reloaded.model(runs[0]["ids"]).logits
    assert (logits - runs[0]["adapter_logits"]).abs().max().item() < 1e-4
