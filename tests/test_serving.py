"""Using the champion: `medlora ask`, `medlora export`, and `mlflow models serve` on models:/medlora-merged@champion."""

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

from conftest import wait_for_http_ok
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
    assert command == (
        f"vllm serve {target / 'base_model'} --enable-lora --lora-modules medlora={target}"
        """ --default-chat-template-kwargs '{"enable_thinking": false}'"""
    )
    manifest = json.loads((target / "medlora_export.json").read_text())
    assert (manifest["version"], manifest["alias"], manifest["vllm_command"]) == ("1", "champion", command)
    for name in ("adapter_config.json", "adapter_model.safetensors", "medlora_base.json", "tokenizer.json"):
        assert (target / name).is_file()
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(target / "base_model")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(target)).eval()
    with torch.no_grad():
        logits = model(outputs[0]["ids"]).logits
    assert (logits - outputs[0]["adapter_logits"]).abs().max().item() < 1e-4


@pytest.mark.slow
def test_mlflow_serves_the_merged_champion(champion_project, params, outputs):  # noqa: F811
    """`mlflow models serve -m models:/medlora-merged@champion` answers a MedMCQA question on /invocations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medlora.core.tracking import tracking_uri
    from medlora.registry.adapter_model import generate

    tokenizer = AutoTokenizer.from_pretrained(str(outputs[0]["merged"]))
    prompt = tokenizer.apply_chat_template(prompt_messages(ROW), add_generation_prompt=True, tokenize=False)
    prompt += ANSWER_PREFIX
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` starts `uvicorn` by name (FINDINGS)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": tracking_uri(params.paths.mlruns_dir),
    }
    port = free_port()
    command = [f"{bin_dir}/mlflow", "models", "serve", "-m", "models:/medlora-merged@champion", "--env-manager",
               "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http_ok(f"{url}/ping", process, "mlflow models serve")
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": [prompt]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # uvicorn is a child: stop the whole group (FINDINGS)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    (answer,) = body["predictions"]
    # The continuation only, greedy, at most max_new_tokens=8: what the merged champion generates in memory.
    merged = AutoModelForCausalLM.from_pretrained(str(outputs[0]["merged"]))
    assert answer == generate(merged, tokenizer, [prompt], max_new_tokens=8)[0]
    assert not answer.startswith("<|im_start|>")
