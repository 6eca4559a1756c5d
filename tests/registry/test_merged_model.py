"""The registered merged model as MLflow "models from code": it answers MedMCQA rows with the training prompt.

The pyfunc file is standalone, so its prompt pieces are copies: they must render exactly what
medlora.modeling.prompts renders (what training taught and evaluation scored), and its answers must be those
`medlora ask` computes with the same weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import example_rows
from medlora.core.config import FormatConfig, RegisterConfig
from registry.test_register import MERGED, build_outputs, gate, pipeline_run, project_params

QUESTION = "Which drug causes cinchonism?"
OPTIONS = ["Aspirin", "Quinine", "Paracetamol", "Ibuprofen"]
RECORD = {"question": QUESTION, **dict(zip(("opa", "opb", "opc", "opd"), OPTIONS, strict=True))}


def test_the_pyfunc_renders_exactly_like_medloras_prompts(tiny_base_dir):
    from transformers import AutoTokenizer

    from medlora.core.contracts import LETTERS, OPTION_COLUMNS
    from medlora.modeling import prompts
    from medlora.registry import merged_pyfunc
    from medlora.serving import FREE_FORM_SYSTEM_PROMPT

    assert (merged_pyfunc.LETTERS, merged_pyfunc.OPTION_COLUMNS) == (LETTERS, OPTION_COLUMNS)
    assert merged_pyfunc.ANSWER_PREFIX == prompts.ANSWER_PREFIX
    assert merged_pyfunc.DEFAULT_SYSTEM_PROMPT == prompts.DEFAULT_SYSTEM_PROMPT == FormatConfig().system_prompt
    assert merged_pyfunc.FREE_FORM_SYSTEM_PROMPT == FREE_FORM_SYSTEM_PROMPT
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    rows = [*example_rows(12), {**RECORD, "question": "  Padded question?\n", "opd": " Ibuprofen "}]
    for system in (FormatConfig().system_prompt, "Another system prompt."):
        for row in rows:
            options = [str(row[column]) for column in OPTION_COLUMNS]
            context = merged_pyfunc.scoring_context(tokenizer, str(row["question"]), options, system)
            assert context == prompts.scoring_context(tokenizer, row, system)
            assert merged_pyfunc.answer_choices(options) == prompts.answer_choices(row)
    free = [{"role": "system", "content": FREE_FORM_SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    assert merged_pyfunc.free_form_prompt(tokenizer, QUESTION) == prompts.render_chat(tokenizer, free, True)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_base_dir) -> dict:
    """Version 1 of the merged model, registered by the register stage in a temp project, and loaded back."""
    import mlflow

    from medlora.core.tracking import tracking_uri
    from medlora.registry.register import run as register

    root = tmp_path_factory.mktemp("merged_project")
    run = build_outputs(tiny_base_dir, root / "built", seed=5)
    params = dataclasses.replace(project_params(root, tiny_base_dir), register=RegisterConfig(register_merged="always"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        pipeline_run(params, run, gate(-5.0))
        assert register(params).merged.version == "1"
        mlflow.set_tracking_uri(tracking_uri(params.paths.mlruns_dir))
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{MERGED}/1", dst_path=str(root / "downloaded")))
        pyfunc = mlflow.pyfunc.load_model(str(local))
    return {"run": run, "local": local, "pyfunc": pyfunc}


def test_mlmodel_is_models_from_code_shipping_the_merged_checkpoint(registered):
    import json

    local = registered["local"]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    assert Path(pyfunc["model_code_path"]).name == "merged_pyfunc.py"
    assert set(mlmodel["flavors"]) == {"python_function"}  # no transformers flavor: a bare pipeline has no prompt
    merged = local / pyfunc["artifacts"]["merged"]["path"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (merged / name).is_file()
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert pyfunc["config"]["system_prompt"] == FormatConfig().system_prompt
    inputs = {column["name"]: column["required"] for column in json.loads(mlmodel["signature"]["inputs"])}
    assert inputs == {"question": True, "opa": False, "opb": False, "opc": False, "opd": False}


def test_a_multiple_choice_row_gets_the_letter_option_and_scores_of_medlora_ask(registered):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medlora.serving import answer_free_form, answer_multiple_choice

    merged_dir = str(registered["run"]["merged"])
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(merged_dir).eval(),
        AutoTokenizer.from_pretrained(merged_dir),
    )
    best, scores = answer_multiple_choice(model, tokenizer, QUESTION, OPTIONS, FormatConfig().system_prompt)
    frame = pd.DataFrame([RECORD, {"question": "What causes diabetes?"}])  # what `dataframe_records` becomes
    choice, free = registered["pyfunc"].predict(frame, params={"max_new_tokens": 5})
    assert (choice["letter"], choice["option"], choice["answer"]) == ("ABCD"[best], OPTIONS[best],
                                                                      f"{'ABCD'[best]}) {OPTIONS[best]}")  # fmt: skip
    assert list(choice["scores"]) == ["A", "B", "C", "D"]
    assert list(choice["scores"].values()) == pytest.approx(scores, abs=1e-4)
    assert (free["letter"], free["option"], free["scores"]) == (None, None, None)
    assert free["answer"] == answer_free_form(model, tokenizer, "What causes diabetes?", max_new_tokens=5)


def test_a_row_with_some_options_missing_is_refused(registered):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"needs all of opa, opb, opc, opd; missing \['opc', 'opd'\]"):
        registered["pyfunc"].predict(pd.DataFrame([{"question": QUESTION, "opa": "x", "opb": "y"}]))
    with pytest.raises(MlflowException, match="non-empty `question`"):
        registered["pyfunc"].predict(pd.DataFrame([{**RECORD, "question": " "}]))
