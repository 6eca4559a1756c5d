"""Using the champion: `medlora ask`, `medlora export`, and the README's `mlflow models serve` command on
models:/medlora-merged@champion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, wait_for_http_ok
from medlora.modeling.prompts import ANSWER_PREFIX, prompt_messages, training_messages
from medlora.registry.client import RegistryError
from medlora.registry.register import run as register
from registry.test_register import free_port, gate, outputs, params, pipeline_run, register_and_promote  # noqa: F401

QUESTION = "Which drug causes cinchonism?"
OPTIONS = ["Aspirin", "Quinine", "Paracetamol", "Ibuprofen"]
ROW = {"question": QUESTION, "opa": OPTIONS[0], "opb": OPTIONS[1], "opc": OPTIONS[2], "opd": OPTIONS[3], "cop": 1}


@pytest.fixture
def champion_project(params, outputs, tmp_path):  # noqa: F811
    """Champion = run 0's adapter and merged model; run 1's registered as challenger. Returns the params file."""
    pipeline_run(params, outputs[0], gate(-5.0))
    register_and_promote(params)
    pipeline_run(params, outputs[1], gate(-5.5))
    register(params)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    return params_file


def ask(params_file: Path, capsys, **changes) -> str:
    from medlora.cli import ask_command
    from medlora.core.config import load_params

    args = {"question": QUESTION, "options": None, "alias": "champion"}
    assert ask_command(load_params(params_file), SimpleNamespace(**{**args, "max_new_tokens": 6, **changes})) == 0
    return capsys.readouterr().out


def test_ask_scores_the_options_with_the_champion_not_the_challenger(champion_project, outputs, capsys):  # noqa: F811
    from peft import PeftModel

    from medlora.modeling.base_model import load_base_model
    from medlora.serving import answer_multiple_choice

    printed = ask(champion_project, capsys, options=" | ".join(OPTIONS)).splitlines()
    base, tokenizer = load_base_model(yaml.safe_load(champion_project.read_text())["paths"]["base_model_dir"])
    champion = PeftModel.from_pretrained(base, str(outputs[0]["adapter"])).eval()
    best, scores = answer_multiple_choice(champion, tokenizer, QUESTION, OPTIONS, prompt_system())
    assert printed[0] == f"{'ABCD'[best]}) {OPTIONS[best]}"
    printed_scores = [float(part.split()[1]) for part in printed[1].removeprefix("log-likelihoods: ").split(", ")]
    assert printed_scores == pytest.approx(scores, abs=1e-3)


def prompt_system() -> str:
    from medlora.core.config import FormatConfig

    return FormatConfig().system_prompt


def test_scored_context_and_choice_tokenize_exactly_like_the_training_example(tiny_base_dir):
    """What `ask` scores is what training taught the model to say first."""
    from transformers import AutoTokenizer

    from medlora.modeling.prompts import answer_choices, scoring_context
    from medlora.serving import continuation_ids

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    context = scoring_context(tokenizer, ROW, prompt_system())
    assert context.endswith(ANSWER_PREFIX)
    trained = tokenizer.apply_chat_template(training_messages(ROW, prompt_system()), tokenize=True, return_dict=True)
    context_ids, choice_ids = continuation_ids(tokenizer, context, answer_choices(ROW)[1])
    assert trained["input_ids"][: len(context_ids) + len(choice_ids)] == context_ids + choice_ids
    assert prompt_messages(ROW, prompt_system())[1]["content"].startswith(f"Question: {QUESTION}")


def test_ask_free_form_generates_with_the_champion(champion_project, outputs, capsys):  # noqa: F811
    from medlora.registry.adapter_model import load_adapter
    from medlora.serving import answer_free_form

    printed = ask(champion_project, capsys, question="What causes diabetes?").rstrip("\n")
    base_dir = yaml.safe_load(champion_project.read_text())["paths"]["base_model_dir"]
    model, tokenizer = load_adapter(outputs[0]["adapter"], base_dir)
    assert printed == answer_free_form(model, tokenizer, "What causes diabetes?", max_new_tokens=6)


def test_ask_needs_four_options_and_a_champion(champion_project, params, capsys):  # noqa: F811
    with pytest.raises(ValueError, match=r"needs 4 options separated by \"\|\", got 2"):
        ask(champion_project, capsys, options="yes|no")
    with pytest.raises(RegistryError, match="no version of medlora-adapter holds the alias 'staging'"):
        ask(champion_project, capsys, alias="staging")


def test_export_writes_a_loadable_adapter_and_the_vllm_command(champion_project, outputs, tmp_path, capsys):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medlora.cli import export_command
    from medlora.core.config import load_params

    target = tmp_path / "export"
    assert export_command(load_params(champion_project), SimpleNamespace(alias="champion", directory=str(target))) == 0
    command = capsys.readouterr().out.strip()
    assert command == (  # printed: runs here, with this machine's paths
        f"vllm serve {target / 'base_model'} --enable-lora --lora-modules medlora={target}"
        """ --default-chat-template-kwargs '{"enable_thinking": false}'"""
    )
    manifest = json.loads((target / "medlora_export.json").read_text())
    assert (manifest["version"], manifest["alias"], manifest["base_model"]) == ("1", "champion", "base_model")
    assert manifest["vllm_command"] == (  # written: runs from inside the directory, wherever it was copied
        """vllm serve base_model --enable-lora --lora-modules medlora=. --default-chat-template-kwargs """
        """'{"enable_thinking": false}'"""
    )
    for name in ("adapter_config.json", "adapter_model.safetensors", "medlora_base.json", "tokenizer.json"):
        assert (target / name).is_file()
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base_model"
    base = AutoModelForCausalLM.from_pretrained(target / config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(target)).eval()
    with torch.no_grad():
        logits = model(outputs[0]["ids"]).logits
    assert (logits - outputs[0]["adapter_logits"]).abs().max().item() < 1e-4


def test_exported_files_carry_no_path_of_the_training_or_exporting_machine(
    champion_project, tmp_path_factory, tmp_path, capsys
):
    """PEFT's README names the base by the path it was loaded from at training (`base_model: /...`, a
    `base_model:adapter:/...` tag): after export no file may name any path of these machines."""
    from medlora.cli import export_command
    from medlora.core.config import load_params

    project = load_params(champion_project)
    target = tmp_path / "export"
    export_command(project, SimpleNamespace(alias="champion", directory=str(target)))
    capsys.readouterr()
    # Every path of this test session (base, adapter, outputs, store, export) lies under pytest's base temp.
    machine = [str(tmp_path_factory.getbasetemp()), project.paths.base_model_dir, str(Path.cwd()), str(Path.home())]
    machine += [str(Path(p).resolve()) for p in machine]
    files = [p for p in target.rglob("*") if p.is_file()]
    assert len(files) > 10
    found = [f"{p.relative_to(target)}: {m}" for p in files for m in set(machine) if m.encode() in p.read_bytes()]
    assert found == []
    readme = (target / "README.md").read_text()
    assert "base_model: base_model\n" in readme and "base_model:adapter:base_model" in readme


def test_export_refuses_to_write_a_file_naming_this_machine(champion_project, tmp_path, monkeypatch):
    from medlora import serving
    from medlora.core.config import load_params

    monkeypatch.setattr(serving, "scrub_paths", lambda directory, replacements: None)  # a file we do not know of
    with pytest.raises(RuntimeError, match=r"would carry this machine's paths \(README.md: /.*nothing written"):
        serving.export_adapter(load_params(champion_project), "champion", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def readme_serving_lines() -> tuple[str, dict]:
    """The README's `mlflow models serve` command and the request body of its curl line, exactly as written."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    (serve,) = [line for line in readme.splitlines() if "mlflow models serve" in line and "models:/" in line]
    (curl,) = [line for line in readme.splitlines() if line.startswith("curl ") and "/invocations" in line]
    return serve, json.loads(curl.split(" -d '", 1)[1].rsplit("'", 1)[0])


def readme_response() -> dict:
    readme = (PROJECT_ROOT / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith('{"predictions": ')]
    return json.loads(line)


def project_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_readme_serve_command_serves_the_merged_champion_with_the_training_prompt(
    champion_project,
    params,  # noqa: F811
    outputs,  # noqa: F811
):
    """The README's command, run as written from the project directory, serves models:/medlora-merged@champion: the
    README's request (MedMCQA columns) gets the letter the in-process scores pick, and a free question an answer;
    what the server leaves behind is git-ignored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medlora.serving import answer_free_form, answer_multiple_choice

    serve, body = readme_serving_lines()
    assert serve.startswith("MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db mlflow models serve ")
    assert serve.endswith(" -p 5001")
    project = Path.cwd()  # the params fixture's project: mlruns/mlflow.db is there
    assert (project / "mlruns" / "mlflow.db").is_file()
    before = project_files(project)
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv, activated
    env.pop("MLFLOW_TRACKING_URI", None)  # only what the README line sets
    process = subprocess.Popen(["bash", "-c", serve.removesuffix("5001") + str(port)], cwd=project, env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    free = {"dataframe_records": [{"question": "What causes diabetes?"}], "params": {"max_new_tokens": 6}}
    try:
        wait_for_http_ok(f"{url}/ping", process, "mlflow models serve")
        answers = [post(f"{url}/invocations", request) for request in (body, free)]
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # uvicorn is a child: stop the whole group (FINDINGS)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    (choice,), (generated,) = (answer["predictions"] for answer in answers)
    merged_dir = str(outputs[0]["merged"])  # the champion's merged model (run 0), in memory
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(merged_dir).eval(),
        AutoTokenizer.from_pretrained(merged_dir),
    )
    row = body["dataframe_records"][0]
    options = [row[column] for column in ("opa", "opb", "opc", "opd")]
    best, scores = answer_multiple_choice(model, tokenizer, row["question"], options, prompt_system())
    assert choice["letter"] == "ABCD"[best] and choice["option"] == options[best]
    assert choice["answer"] == f"{'ABCD'[best]}) {options[best]}"
    assert list(choice["scores"].values()) == pytest.approx(scores, abs=1e-4)
    assert choice["scores"][choice["letter"]] == max(choice["scores"].values())
    print("README response:", json.dumps(answers[0]))
    (example,) = readme_response()["predictions"]
    assert {key: type(value) for key, value in example.items()} == {key: type(v) for key, v in choice.items()}
    assert list(example["scores"]) == list(choice["scores"]) == ["A", "B", "C", "D"]
    assert (generated["letter"], generated["scores"]) == (None, None)
    assert generated["answer"] == answer_free_form(model, tokenizer, "What causes diabetes?", max_new_tokens=6)
    left = sorted(project_files(project) - before)
    print("left by the server:", left)
    assert "mlflow.db" not in left  # the stray store the command made without MLFLOW_TRACKING_URI
    assert subprocess.run(["git", "check-ignore", "--no-index", "-q", "mlflow.db"], cwd=PROJECT_ROOT).returncode == 0
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *left],
                             cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    assert [line for line in ignored if line.startswith("::")] == [], f"not git-ignored: {ignored}"


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())
