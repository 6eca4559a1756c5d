"""The evaluate stage on the real harness: tiny NemotronH, a random-init LoRA adapter, its merge, 8 questions."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, example_rows, write_train_report
from medlora.core.config import FormatConfig, parse_params
from medlora.core.contracts import EvalReport, TrainReport
from medlora.core.io import read_json, write_jsonl
from medlora.data.schema import read_jsonl_rows
from medlora.evaluation.harness import (
    TASKS_DIR,
    EvaluationError,
    build_task_manager,
    model_arguments,
    resolve_primary_metric,
    resolve_tasks,
)
from medlora.evaluation.harness import run as evaluate
from medlora.evaluation.significance import build_gate, mcnemar_p_value, paired_test, wilcoxon_p_value

SYSTEM_PROMPT = FormatConfig().system_prompt
LIMIT = 8
LORA_RANK = 4


def validation_rows(n: int = 12) -> list[dict]:
    """Validation rows whose ids no train row has (train fixtures are fixture-NNNN)."""
    return [{**row, "id": f"val-{i:04d}"} for i, row in enumerate(example_rows(n))]


def project_params(root: Path, **evaluate):
    paths = {
        "validated_dir": "outputs/validated",
        "base_model_dir": "outputs/base_model",
        "adapter_dir": "outputs/adapter",
        "merged_dir": "outputs/merged",
        "eval_dir": "outputs/eval",
        "reports_dir": "reports",
        "mlruns_dir": "mlruns",
    }
    raw = {
        "paths": {key: str(root / value) for key, value in paths.items()},
        "evaluate": {"limit": LIMIT, "batch_size": 8, "primary_metric": "auto", **evaluate},
    }
    return parse_params(raw)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base_dir) -> Path:
    """outputs/{base_model, adapter (random-init LoRA, B != 0), merged, validated/validation.jsonl}."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medlora.modeling.base_model import BASE_REFERENCE_FILE, load_base_model

    root = tmp_path_factory.mktemp("evalproject")
    outputs = root / "outputs"
    shutil.copytree(tiny_base_dir, outputs / "base_model")
    write_jsonl(outputs / "validated" / "validation.jsonl", validation_rows())
    model, tokenizer = load_base_model(outputs / "base_model")
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter really changes the model's outputs.
    lora = LoraConfig(
        r=LORA_RANK, lora_alpha=8, target_modules=["q_proj", "v_proj", "in_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(outputs / "adapter")
    tokenizer.save_pretrained(outputs / "adapter")
    shutil.copy(outputs / "base_model" / BASE_REFERENCE_FILE, outputs / "adapter" / BASE_REFERENCE_FILE)
    peft_model.merge_and_unload().save_pretrained(outputs / "merged")
    tokenizer.save_pretrained(outputs / "merged")
    return root


@pytest.fixture(scope="module")
def report(project) -> EvalReport:
    """One real evaluation of base, adapter and merged (3 tasks, 8 questions each), logged to a pipeline run."""
    from medlora.core.tracking import start_pipeline_run

    params = project_params(project)
    with start_pipeline_run(params) as run:  # what the train stage leaves behind
        pass
    write_train_report(project / "reports", run.info.run_id)
    result = evaluate(params)
    result.write(project / "reports")
    return result


def task_manager(project: Path, tasks: list[str]):
    return build_task_manager(
        tasks, project / "outputs/validated/validation.jsonl", project / "outputs/base_model", SYSTEM_PROMPT
    )


# ---------------------------------------------------------------- task definitions


def test_shipped_tasks_load_through_task_manager(project):
    manager = task_manager(project, ["medmcqa_local", "medmcqa_chat", "medmcqa_chat_loglik"])
    assert sorted(manager.all_tasks) == ["medmcqa_chat", "medmcqa_chat_loglik", "medmcqa_local"]
    tasks = manager.load(["medmcqa_local", "medmcqa_chat", "medmcqa_chat_loglik"])["tasks"]
    assert {name: task.OUTPUT_TYPE for name, task in tasks.items()} == {
        "medmcqa_local": "multiple_choice",
        "medmcqa_chat": "multiple_choice",
        "medmcqa_chat_loglik": "loglikelihood",
    }
    for task in tasks.values():
        assert [doc["id"] for doc in task.eval_docs] == [row["id"] for row in validation_rows()]
    assert set(tasks["medmcqa_chat_loglik"].aggregation()) == {"answer_loglik", "answer_greedy"}


def test_medmcqa_local_builds_the_same_requests_as_builtin_medmcqa(project):
    """lm-eval's own medmcqa YAML, fed our rows instead of the hub's, must produce identical requests."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin_yaml = Path(importlib.util.find_spec("lm_eval.tasks").origin).parent / "medmcqa" / "medmcqa.yaml"
    local_yaml = load_yaml(TASKS_DIR / "medmcqa_local.yaml")
    validation_file = str(project / "outputs/validated/validation.jsonl")
    builtin = ConfigurableTask(
        config={
            **load_yaml(builtin_yaml),
            "custom_dataset": local_yaml["custom_dataset"],  # same docs, no hub
            "training_split": None,  # our file has the validation split only (no few-shot pool needed)
            "validation_split": None,
            "metadata": {"validation_file": validation_file},
        }
    )
    ours = task_manager(project, ["medmcqa_local"]).load(["medmcqa_local"])["tasks"]["medmcqa_local"]
    for task in (builtin, ours):
        task.build_all_requests(limit=LIMIT)
    assert [i.arguments for i in ours.instances] == [i.arguments for i in builtin.instances]
    assert len(ours.instances) == 4 * LIMIT
    assert ours.instances[0].arguments[0].startswith("Question: Which drug causes cinchonism?\nChoices:\nA. ")
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in builtin.config.metric_list]


def test_chat_requests_tokenize_exactly_like_training(project):
    """HFLM's encoding of lm-eval's requests is a prefix of the format stage's training tokens."""
    from lm_eval.models.huggingface import HFLM

    from medlora.modeling.formatting import render_example

    lm = HFLM(pretrained=str(project / "outputs/base_model"), device="cpu", batch_size=1)
    tasks = task_manager(project, ["medmcqa_chat", "medmcqa_chat_loglik"]).load(
        ["medmcqa_chat", "medmcqa_chat_loglik"]
    )["tasks"]
    for task in tasks.values():
        task.build_all_requests(limit=3)
    rows = {row["id"]: row for row in validation_rows()}
    config = FormatConfig(system_prompt=SYSTEM_PROMPT, include_explanation=False)
    end_of_turn = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    checked = 0
    for task_name, task in tasks.items():
        for instance in task.instances:
            doc = instance.doc
            if task_name == "medmcqa_chat" and instance.idx != doc["cop"]:
                continue  # only the correct choice is what training saw
            example = render_example(rows[doc["id"]], lm.tokenizer, config)
            ids, mask = example["input_ids"], example["completion_mask"]
            context_enc, continuation_enc = lm._encode_pair(*instance.arguments)
            scored = len(context_enc) + len(continuation_enc)
            assert context_enc + continuation_enc == ids[:scored]
            # What is left of the assistant turn is only its end-of-turn token.
            assert ids[scored] == end_of_turn and mask[scored] == 1 and sum(mask[scored + 1 :]) == 0
            continuation_mask = mask[len(context_enc) : scored]
            if task_name == "medmcqa_chat":
                assert all(continuation_mask)  # every scored token carried the training loss
            else:
                # lm-eval moves the context's trailing "\n" (end of the assistant header) into the continuation.
                assert lm.tokenizer.decode(continuation_enc[:1]) == "\n"
                assert continuation_mask == [0] + [1] * (len(continuation_enc) - 1)
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------- paired statistics


def test_mcnemar_exact_on_discordant_pairs():
    # 10 discordant pairs, 9 for the adapter: p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11 / 1024.
    base = [1] * 1 + [0] * 9 + [1] * 5 + [0] * 5
    adapter = [0] * 1 + [1] * 9 + [1] * 5 + [0] * 5
    assert mcnemar_p_value(base, adapter) == pytest.approx(22 / 1024, abs=1e-12)
    assert mcnemar_p_value(adapter, base) == pytest.approx(22 / 1024, abs=1e-12)  # two-sided
    assert mcnemar_p_value([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant pair, no evidence
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_p_value([1, 0], [1])


def test_wilcoxon_signed_rank_exact():
    # Six positive differences with distinct ranks: exact two-sided p = 2 / 2**6.
    assert wilcoxon_p_value([0.0] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(2 / 64, abs=1e-12)
    # One negative difference of rank 1: W- = 1, P(W <= 1) = 2/64, two-sided 4/64.
    assert wilcoxon_p_value([0.0] * 6, [-1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(4 / 64, abs=1e-12)
    assert wilcoxon_p_value([-3.0, -2.0], [-3.0, -2.0]) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon_p_value([float("nan")], [1.0])


def test_gate_pairs_questions_by_id_and_picks_the_test_by_metric():
    per_question = {
        "base": {"q1": -10.0, "q2": -9.0, "q3": -8.0, "q4": -7.0, "q5": -6.0, "q6": -5.0, "only-base": -1.0},
        "adapter": {"q1": -9.0, "q2": -7.0, "q3": -5.0, "q4": -3.0, "q5": -1.0, "q6": 1.0},
    }
    gate = build_gate(
        "medmcqa_chat_loglik/answer_loglik", {"base": -7.5, "adapter": -4.0, "merged": -4.01}, per_question
    )
    assert gate.uplift == pytest.approx(3.5)
    assert gate.merged_vs_adapter == pytest.approx(0.01)
    assert gate.n_paired == 6 and gate.test == "wilcoxon_signed_rank"
    assert gate.p_value == pytest.approx(2 / 64, abs=1e-12)
    assert paired_test("acc", [1, 0], [0, 1])[0] == "mcnemar_exact"
    no_merged = build_gate("medmcqa_chat/acc", {"base": 0.25, "adapter": 0.5}, {})
    assert no_merged.merged is None and no_merged.merged_vs_adapter is None and no_merged.p_value is None


# ---------------------------------------------------------------- the stage


def test_primary_metric_resolution():
    params = parse_params({"evaluate": {"primary_metric": "auto"}})
    assert resolve_primary_metric(params, resolve_tasks(params.evaluate)) == "medmcqa_chat_loglik/answer_loglik"
    production = parse_params({"model": {"preset": "nemotron-3-nano-30b-a3b"}, "evaluate": {"primary_metric": "auto"}})
    assert resolve_primary_metric(production, resolve_tasks(production.evaluate)) == "medmcqa_chat/acc"
    hub = parse_params({"evaluate": {"source": "hub", "primary_metric": "medmcqa_local/acc"}})
    assert resolve_tasks(hub.evaluate)[0] == "medmcqa"
    assert resolve_primary_metric(hub, resolve_tasks(hub.evaluate)) == "medmcqa/acc"
    wrong = parse_params(
        {"evaluate": {"tasks": ["medmcqa_chat"], "primary_metric": "medmcqa_chat_loglik/answer_loglik"}}
    )
    with pytest.raises(EvaluationError, match="primary_metric"):
        resolve_primary_metric(wrong, resolve_tasks(wrong.evaluate))


def test_eval_json_contract(report, project):
    gate = report.gate
    assert set(report.to_dict()["gate"]) >= {
        "metric",
        "base",
        "adapter",
        "merged",
        "uplift",
        "p_value",
        "merged_vs_adapter",
    }
    assert gate.metric == "medmcqa_chat_loglik/answer_loglik"
    results = report.results
    assert gate.base == results["base"]["medmcqa_chat_loglik"]["answer_loglik"]
    assert gate.uplift == pytest.approx(gate.adapter - gate.base)
    assert gate.uplift != 0  # the random LoRA changes the model
    assert 0 < gate.p_value <= 1 and gate.n_paired == LIMIT
    # The merged model is the adapter folded into the weights: same figures up to float error.
    assert gate.merged_vs_adapter < 1e-3 * abs(gate.adapter)
    for model in ("base", "adapter", "merged"):
        for task in ("medmcqa_local", "medmcqa_chat"):
            figures = results[model][task]
            assert set(figures) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
            assert figures["n"] == LIMIT and 0 <= figures["acc"] <= 1
            subjects = figures["by_subject_name"]
            assert sum(group["n"] for group in subjects.values()) == LIMIT
            weighted = sum(group["acc"] * group["n"] for group in subjects.values()) / LIMIT
            assert weighted == pytest.approx(figures["acc"])
            assert figures["by_choice_type"]["single"]["n"] == LIMIT
        loglik = results[model]["medmcqa_chat_loglik"]
        assert loglik["answer_loglik"] < 0 and loglik["answer_loglik_stderr"] > 0 and loglik["n"] == LIMIT
        assert report.runs[model]["wall_seconds"] > 0
    assert report.runs["adapter"]["model_args"]["peft"] == str((project / "outputs/adapter").resolve())
    assert report.wall_seconds > 0
    assert read_json(project / "reports/eval.json") == report.to_dict()
    assert EvalReport.read(project / "reports").gate == report.gate
    assert (project / "reports/plots/subject_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_samples_come_from_the_validation_split_only(report, project):
    validation_ids = [row["id"] for row in validation_rows()][:LIMIT]
    for model in ("base", "adapter", "merged"):
        for task in ("medmcqa_local", "medmcqa_chat", "medmcqa_chat_loglik"):
            samples = read_jsonl_rows(project / "outputs/eval" / model / f"{task}.jsonl", required=("id", "context"))
            assert [sample["id"] for sample in samples] == validation_ids
    chat = read_jsonl_rows(project / "outputs/eval/adapter/medmcqa_chat.jsonl", required=("continuations",))
    assert chat[0]["context"].endswith("<|im_start|>assistant\nThe correct answer is")
    assert chat[0]["continuations"][0].startswith(" A) ")


def test_metrics_logged_to_the_pipeline_run(report, project, monkeypatch):
    import mlflow

    from medlora.core.tracking import configure_tracking

    configure_tracking(project_params(project))
    run_id = TrainReport.read(project / "reports").mlflow_run_id
    logged = mlflow.get_run(run_id).data.metrics
    assert logged["eval.gate.uplift"] == pytest.approx(report.gate.uplift)
    assert logged["eval.adapter.medmcqa_chat.acc"] == pytest.approx(report.results["adapter"]["medmcqa_chat"]["acc"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluate")}
    assert artifacts == {"evaluate/eval.json", "evaluate/subject_accuracy.png"}


def test_vllm_backend_builds_lora_model_args_then_stops_without_vllm(project):
    params = project_params(project, backend="vllm")
    lm_type, args = model_arguments("adapter", params)
    assert lm_type == "vllm"
    assert args["pretrained"] == str((project / "outputs/base_model").resolve())
    assert args["enable_lora"] is True and args["lora_local_path"] == str((project / "outputs/adapter").resolve())
    assert args["max_lora_rank"] == 8  # r=4 rounded up to the smallest rank vLLM accepts
    assert "peft" not in args and "device" not in args
    assert model_arguments("merged", params)[1]["pretrained"] == str((project / "outputs/merged").resolve())
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: the run itself needs a GPU")
    with pytest.raises(EvaluationError, match="vllm"):
        evaluate(params)


def test_hub_source_fails_fast_offline(project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = project_params(project, source="hub")
    params = parse_params(
        {**params.to_dict(), "paths": {**params.to_dict()["paths"], "eval_dir": str(project / "hub")}}
    )
    started = time.monotonic()
    with pytest.raises(EvaluationError, match=r"medmcqa.*HF_HUB_OFFLINE"):
        evaluate(params)
    assert time.monotonic() - started < 15
    assert not (project / "hub").exists()  # stopped before any model ran


def test_validation_split_never_feeds_training(project, tiny_base_dir, tmp_path):
    """The real format stage, given train and validation files, writes train/early-stop rows from train only."""
    outputs = tmp_path / "outputs"
    train = example_rows(30)
    write_jsonl(outputs / "validated" / "train.jsonl", train)
    write_jsonl(outputs / "validated" / "validation.jsonl", validation_rows())
    shutil.copytree(tiny_base_dir, outputs / "base_model")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["format"]["early_stopping_size"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pipelines" / "format.py")], cwd=tmp_path, env=env, check=True, timeout=120
    )
    formatted = outputs / "formatted"
    used = [
        row["id"] for name in ("train.jsonl", "early_stop.jsonl") for row in read_jsonl_rows(formatted / name, ("id",))
    ]
    assert len(read_jsonl_rows(formatted / "early_stop.jsonl", ("id",))) == 5
    assert set(used) == {row["id"] for row in train}
    assert not set(used) & {row["id"] for row in validation_rows()}
    # Nothing downstream of format reads the validated split: only `evaluate` depends on validation.jsonl.
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    readers = [
        name
        for name, stage in stages.items()
        for dep in stage.get("deps", [])
        if dep == "${paths.validated_dir}" or "validation.jsonl" in str(dep)
    ]
    assert readers == ["evaluate"]


def test_hub_task_is_the_builtin_one_with_the_dataset_revision_pinned(project):
    """Up to the network boundary: the task lm-eval would download for `evaluate.source: hub`."""
    tasks = resolve_tasks(project_params(project, source="hub").evaluate)
    manager = build_task_manager(tasks, project / "outputs/validated/validation.jsonl", project, "sys", "abc123")
    config = manager._entry("medmcqa").cfg
    assert config["dataset_path"] == "openlifescienceai/medmcqa" and config["dataset_kwargs"] == {"revision": "abc123"}
    assert config["doc_to_text"].endswith("utils_medmcqa.doc_to_text") and config["test_split"] == "validation"
    with pytest.raises(EvaluationError, match=r"needs snapshot\.revision"):
        build_task_manager(tasks, project / "outputs/validated/validation.jsonl", project, "sys", None)


def test_a_tokenizer_longer_than_the_embeddings_is_refused(project, tmp_path):
    from transformers import AutoTokenizer

    from medlora.evaluation.harness import check_vocab_fits

    base = project / "outputs/base_model"
    check_vocab_fits(base, str(base), None)  # the model stage's own tokenizer fits
    longer = AutoTokenizer.from_pretrained(base)
    longer.add_tokens([f"<extra_{i}>" for i in range(64)])
    longer.save_pretrained(tmp_path / "longer")
    with pytest.raises(EvaluationError, match=r"has \d+ tokens but .* embeds only \d+"):
        check_vocab_fits(tmp_path / "longer", str(base), None)
