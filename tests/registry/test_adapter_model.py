"""The registered adapter as MLflow "models from code": what the MLmodel declares, what it requires, and that a
fresh Python process (medlora not imported beforehand, or not importable at all) loads the very weights trained.

The fresh process matters: in the test process medlora is already imported, which hides exactly the failure a
pickle referring to medlora's modules would have elsewhere. Logits are compared with the in-memory PeftModel,
because a base that reloads with random weights (FINDINGS) still generates plausible-looking text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

from medlora.core.config import RegisterConfig
from medlora.modeling.base_model import BASE_REFERENCE_FILE, BaseModelUnavailable
from registry.test_register import ADAPTER, build_outputs, gate, max_diff, pipeline_run, project_params

PROMPT = "Question: Which drug causes cinchonism?\nAnswer:"
NEW_TOKENS = 6
MODEL_URI = f"models:/{ADAPTER}/1"

logger = logging.getLogger(__name__)

# Runs in a fresh interpreter: argv = model uri, token ids (JSON), prompt, max_new_tokens, "block" or "allow".
FRESH_PROCESS = r"""
import importlib.abc, json, sys

class BlockMedlora(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "medlora" or name.startswith("medlora."):
            raise ImportError(f"medlora is blocked in this process ({name})")
        return None

if sys.argv[5] == "block":
    sys.meta_path.insert(0, BlockMedlora())

def medlora_modules():
    return sorted(name for name in sys.modules if name == "medlora" or name.startswith("medlora."))

import mlflow.pyfunc
import torch

before = medlora_modules()
pyfunc = mlflow.pyfunc.load_model(sys.argv[1])
wrapper = pyfunc.unwrap_python_model()
with torch.no_grad():
    logits = wrapper.model(torch.tensor(json.loads(sys.argv[2]))).logits
(answer,) = pyfunc.predict([sys.argv[3]], params={"max_new_tokens": int(sys.argv[4])})
print("RESULT " + json.dumps({
    "medlora_before_load": before,
    "medlora_after_load": medlora_modules(),
    "wrapper_module": type(wrapper).__module__,
    "logits": logits.tolist(),
    "answer": answer,
}))
"""


def build_run(base_dir: Path, out: Path, seed: int) -> dict:
    """build_outputs (test_register) on PROMPT: the in-memory PeftModel's logits and greedy continuation."""
    built = build_outputs(base_dir, out, seed, prompt=PROMPT, new_tokens=NEW_TOKENS)
    return {**built, "logits": built["adapter_logits"]}


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_base_dir) -> dict:
    """One adapter registered (version 1) in a temp project's SQLite store, through the register stage.

    The gates fail on purpose (p-value 0.5) so the merged model is not registered: it is not under test here.
    """
    import mlflow

    from medlora.core.tracking import tracking_uri
    from medlora.registry.register import run as register

    root = tmp_path_factory.mktemp("adapter_project")
    run = build_run(tiny_base_dir, root / "built", seed=11)
    params = dataclasses.replace(
        project_params(root, tiny_base_dir), register=RegisterConfig(register_merged="if_promotable")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        pipeline_run(params, run, gate(-5.0, p_value=0.5))
        registration = register(params)
        assert registration.adapter.version == "1" and registration.merged is None
        uri = tracking_uri(params.paths.mlruns_dir)
        mlflow.set_tracking_uri(uri)
        local = Path(mlflow.artifacts.download_artifacts(MODEL_URI, dst_path=str(root / "downloaded")))
    return {"run": run, "params": params, "tracking_uri": uri, "local": local, "root": root}


def mlmodel(local: Path) -> dict:
    return yaml.safe_load((local / "MLmodel").read_text())


def test_mlmodel_declares_models_from_code_and_ships_no_pickle(registered):
    from medlora.registry import adapter_pyfunc

    local = registered["local"]
    pyfunc = mlmodel(local)["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(pyfunc["model_code_path"]).name == "adapter_pyfunc.py"
    # No cloudpickled model (MLflow still writes `cloudpickle_version`; only `python_model` would name a pickle).
    assert "python_model" not in pyfunc
    # The artifact names serving.export_adapter reads; MLflow names the directories after their sources.
    paths = {name: spec["path"] for name, spec in pyfunc["artifacts"].items()}
    assert set(paths) == {"adapter", "base"}
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "adapter_pyfunc.py" in files and "MLmodel" in files
    assert not [name for name in files if name.endswith((".pkl", ".pickle"))]
    assert f"{paths['adapter']}/adapter_model.safetensors" in files
    assert f"{paths['base']}/model.safetensors" in files and f"{paths['base']}/{BASE_REFERENCE_FILE}" in files
    # The shipped code is the package's file as it was at registration: nothing else runs at load time.
    assert (local / "adapter_pyfunc.py").read_bytes() == Path(adapter_pyfunc.__file__).read_bytes()
    signature = mlmodel(local)["signature"]
    assert json.loads(signature["inputs"]) == [{"type": "string", "required": True}]
    (param,) = json.loads(signature["params"])
    assert (param["name"], param["type"], param["default"]) == ("max_new_tokens", "long", 64)


def test_requirements_pin_medlora_and_the_model_stack(registered):
    lines = (registered["local"] / "requirements.txt").read_text().split()
    assert f"medlora=={version('medlora')}" in lines
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "mlflow"):
        assert f"{name}=={version(name).split('+')[0]}" in lines
    assert not [line for line in lines if "+" in line or line.startswith("torchvision")]


@pytest.mark.parametrize("medlora", ["allow", "block"])
def test_a_fresh_process_loads_the_registered_adapter_with_the_trained_logits(registered, medlora, tmp_path):
    run = registered["run"]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["tracking_uri"],
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    ids = json.dumps(run["ids"].tolist())
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, MODEL_URI, ids, PROMPT, str(NEW_TOKENS), medlora],
        env=env,
        cwd=tmp_path,  # not the repository: nothing on sys.path but what is installed
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["medlora_before_load"] == []
    assert result["wrapper_module"].startswith("code_model_")  # MLflow ran the shipped file, not a medlora module
    if medlora == "block":
        assert result["medlora_after_load"] == []  # standalone: torch, transformers, peft and mlflow suffice
    difference = max_diff(torch.tensor(result["logits"]), run["logits"])
    logger.info("fresh process (medlora %s): max abs logit difference %.3g, %.1f s", medlora, difference, seconds)
    assert difference < 1e-4
    assert result["answer"] == run["answer"]


def test_predict_contract_strings_lists_and_dataframes(registered):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(registered["tracking_uri"])
    pyfunc = mlflow.pyfunc.load_model(str(registered["local"]))
    wrapper = pyfunc.unwrap_python_model()
    assert wrapper.model is not None and wrapper.tokenizer is not None  # what serving.load_champion reads
    expected = registered["run"]["answer"]
    params = {"max_new_tokens": NEW_TOKENS}
    assert list(pyfunc.predict(PROMPT, params=params)) == [expected]
    assert list(pyfunc.predict([PROMPT, PROMPT], params=params)) == [expected, expected]
    frame = pd.DataFrame({"prompt": [PROMPT], "ignored": ["x"]})
    assert list(wrapper.predict(None, frame, params=params)) == [expected]
    # The default (64 new tokens) continues at least as far as the 6-token answer.
    (long_answer,) = pyfunc.predict([PROMPT])
    assert long_answer.startswith(expected)


def test_a_corrupt_or_missing_shipped_base_fails_with_base_model_unavailable(registered, tmp_path):
    import mlflow

    corrupt = tmp_path / "corrupt"
    shutil.copytree(registered["local"], corrupt)
    base = mlmodel(corrupt)["flavors"]["python_function"]["artifacts"]["base"]["path"]
    weights = corrupt / base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(BaseModelUnavailable, match="does not match the weights_sha256"):
        mlflow.pyfunc.load_model(str(corrupt))

    missing = tmp_path / "missing"
    shutil.copytree(registered["local"], missing)
    shutil.rmtree(missing / base)
    with pytest.raises(BaseModelUnavailable, match="neither shipped with it nor named"):
        mlflow.pyfunc.load_model(str(missing))


def test_the_standalone_copies_agree_with_medlora(tiny_base_dir):
    from medlora.core.io import directory_hash, read_json
    from medlora.modeling import base_model
    from medlora.registry import adapter_model, adapter_pyfunc

    assert adapter_pyfunc.BASE_REFERENCE_FILE == base_model.BASE_REFERENCE_FILE
    assert adapter_pyfunc.BaseModelUnavailable is base_model.BaseModelUnavailable  # medlora importable here
    assert adapter_model.load_adapter is adapter_pyfunc.load_adapter  # one implementation
    exclude = frozenset({BASE_REFERENCE_FILE})
    assert adapter_pyfunc.directory_hash(tiny_base_dir, exclude) == directory_hash(tiny_base_dir, exclude)
    assert adapter_pyfunc.directory_hash(tiny_base_dir) == directory_hash(tiny_base_dir)
    recorded = read_json(tiny_base_dir / BASE_REFERENCE_FILE)["weights_sha256"]
    assert adapter_pyfunc.directory_hash(tiny_base_dir, exclude) == recorded
