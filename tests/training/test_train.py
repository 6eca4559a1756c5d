"""The train stage on the tiny NemotronH: what training changes, fallbacks, health checks, resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, example_rows
from medlora.core.config import LoraParams, Params, PathsConfig, TrainConfig
from medlora.training.backends import (
    TRAIN_OWN_KEYS,
    UnslothUnavailable,
    cpu_fallbacks,
    lora_kwargs,
    resolve_backend,
    sft_config,
)
from medlora.training.coverage import CoverageError
from medlora.training.resume import CHECKPOINT_MARK, find_resumable_checkpoint

FAST_TRAIN = {
    "per_device_train_batch_size": 4,
    "max_steps": 6,
    "warmup_steps": 1,
    "logging_steps": 1,
    "eval_steps": 3,
    "save_steps": 3,
}


def tokenize(rows, tokenizer):
    from medlora.modeling.prompts import training_messages

    for row in rows:
        out = tokenizer.apply_chat_template(
            training_messages(row), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        yield {"id": row["id"], "input_ids": list(out["input_ids"]), "completion_mask": list(out["assistant_masks"])}


@pytest.fixture(scope="module")
def formatted_dir(tiny_base_dir, tmp_path_factory) -> Path:
    """outputs/formatted as the format stage writes it: 48 train rows, 16 early-stop rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    out = tmp_path_factory.mktemp("formatted")
    examples = list(tokenize(example_rows(64), tokenizer))
    for name, part in (("train.jsonl", examples[:48]), ("early_stop.jsonl", examples[48:])):
        (out / name).write_text("".join(json.dumps(e) + "\n" for e in part))
    return out


def stage_params(root: Path, base_dir: Path, formatted: Path, lora: dict | None = None, **train) -> Params:
    paths = PathsConfig(
        reports_dir=str(root / "reports"),
        base_model_dir=str(base_dir),
        formatted_dir=str(formatted),
        checkpoints_dir=str(root / "outputs" / "checkpoints"),
        adapter_dir=str(root / "outputs" / "adapter"),
        merged_dir=str(root / "outputs" / "merged"),
        mlruns_dir=str(root / "mlruns"),
    )
    return Params(paths=paths, lora=LoraParams(**(lora or {})), train=TrainConfig(**(FAST_TRAIN | train)))


def test_cpu_fallbacks_replace_gpu_only_options_with_one_logged_line(caplog):
    overrides, notes = cpu_fallbacks(TrainConfig(optim="adamw_8bit", bf16=True), has_gpu=False)
    assert overrides == {"optim": "adamw_torch"} and len(notes) == 1  # bf16 stays: use_cpu=True runs it on a CPU
    assert cpu_fallbacks(TrainConfig(optim="adamw_8bit", bf16=True), has_gpu=True) == ({}, [])
    with caplog.at_level(logging.WARNING, logger="medlora.training.backends"):
        args = sft_config(TrainConfig(optim="adamw_8bit", bf16=True), "unused", has_gpu=False)
    assert args.optim == "adamw_torch" and args.bf16 is True and args.use_cpu is True
    lines = [r.getMessage() for r in caplog.records if r.name == "medlora.training.backends"]
    assert lines == ["no GPU: optim adamw_8bit -> adamw_torch (bitsandbytes needs CUDA)"]


def test_gpu_run_without_kernels_or_bitsandbytes_is_refused_before_loading(monkeypatch):
    """The CUDA boundary: on a GPU the missing packages are named with the install command; on a CPU nothing."""
    import importlib.util

    from medlora.training.backends import check_gpu_requirements

    installed = {"mamba_ssm": False, "causal_conv1d": False, "bitsandbytes": False}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if installed.get(name) else (
            None if name in installed else real_find_spec(name, *a))
    )  # fmt: skip
    production = TrainConfig(optim="adamw_8bit")
    check_gpu_requirements(production, "nemotron_h", has_gpu=False)  # CPU: the torch scan and adamw_torch
    with pytest.raises(RuntimeError, match=r"without mamba_ssm, causal_conv1d.*pip install -e '\.\[gpu\]'"):
        check_gpu_requirements(production, "nemotron_h", has_gpu=True)
    check_gpu_requirements(TrainConfig(), "llama", has_gpu=True)  # not a Mamba hybrid, adamw_torch
    installed.update(mamba_ssm=True, causal_conv1d=True)
    with pytest.raises(RuntimeError, match="adamw_8bit needs bitsandbytes"):
        check_gpu_requirements(production, "nemotron_h", has_gpu=True)
    installed.update(mamba_ssm=False, bitsandbytes=True)
    check_gpu_requirements(dataclasses.replace(production, allow_reference_mamba_scan=True), "nemotron_h", has_gpu=True)


def test_gpu_check_runs_before_any_weights_load(tmp_path, tiny_base_dir, formatted_dir, monkeypatch):
    import torch

    from medlora.training import backends
    from medlora.training.train import run as train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    a100 = type("Properties", (), {"total_memory": 80 * 2**30, "name": "fake A100"})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: a100)  # the memory plan reads it
    monkeypatch.setattr(backends, "load_peft_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    monkeypatch.setattr("accelerate.PartialState.__init__", lambda self, cpu=False: None)
    monkeypatch.setattr("accelerate.PartialState.is_main_process", True, raising=False)
    monkeypatch.setattr("accelerate.PartialState.wait_for_everyone", lambda self: None)
    with pytest.raises(RuntimeError, match="slow reference Mamba scan"):
        train(stage_params(tmp_path, tiny_base_dir, formatted_dir))


def test_sft_config_takes_train_params_under_their_own_names():
    train = TrainConfig(learning_rate=3e-4, warmup_steps=7, gradient_accumulation_steps=2, save_steps=11)
    args = sft_config(train, "unused", has_gpu=False)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in TRAIN_OWN_KEYS:
            value = getattr(args, field.name)
            assert getattr(value, "value", value) == getattr(train, field.name), field.name
    assert args.completion_only_loss is True and args.packing is False and args.padding_free is False


def test_lora_kwargs_pass_names_through_and_refuse_dropout_on_routed_experts():
    kwargs = lora_kwargs(LoraParams())
    assert kwargs["target_modules"] == list(LoraParams().target_modules) and "required_blocks" not in kwargs
    with pytest.raises(ValueError, match=r"needs lora\.lora_dropout: 0"):
        lora_kwargs(LoraParams(target_parameters=("mixer.experts.up_proj",), lora_dropout=0.05))


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here")
def test_unsloth_backend_without_unsloth_fails_at_once_with_install_hint(caplog):
    with pytest.raises(UnslothUnavailable, match=r"make unsloth-test.*pip install --no-deps unsloth==2026\.10\.9"):
        resolve_backend("unsloth")
    with caplog.at_level(logging.INFO, logger="medlora.training.backends"):
        assert resolve_backend("auto") == "hf"
    assert "using hf" in caplog.text


def test_checkpoints_resume_only_when_complete_and_written_with_the_same_fingerprint(tmp_path):
    fingerprint = {"params_hash": "a", "inputs_hash": "b"}
    for step, mark in ((3, fingerprint), (6, fingerprint), (9, None)):  # 9: killed while saving
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        if mark:
            (checkpoint / "trainer_state.json").write_text("{}")
            (checkpoint / CHECKPOINT_MARK).write_text(json.dumps({**mark, "mlflow_run_id": "run1"}))
    assert find_resumable_checkpoint(tmp_path, fingerprint) == (tmp_path / "checkpoint-6", "run1")
    assert find_resumable_checkpoint(tmp_path, {"params_hash": "other", "inputs_hash": "b"}) == (None, "")
    assert not list(tmp_path.glob("checkpoint-*"))  # stale checkpoints are removed, so they cannot be picked later


def test_training_changes_the_adapter_not_the_base_and_logs_eval_loss(tmp_path, tiny_base_dir, formatted_dir):
    import mlflow
    from peft import PeftModel
    from safetensors.torch import load_file

    from medlora.modeling.base_model import load_base_model
    from medlora.training.train import run as train

    params = stage_params(tmp_path, tiny_base_dir, formatted_dir)
    report = train(params)

    adapter = load_file(tmp_path / "outputs" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in key or ".lora_B." in key for key in adapter)  # no base weight shipped
    assert all(tensor.abs().sum() > 0 for key, tensor in adapter.items() if ".lora_B." in key)  # B starts at 0
    base, _ = load_base_model(tiny_base_dir)
    reference = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = PeftModel.from_pretrained(base, str(tmp_path / "outputs" / "adapter"))
    for name, parameter in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert parameter.equal(reference[name.replace(".base_layer", "")]), name

    assert report.coverage["passed"] and report.coverage["gradient_check"]["passed"]
    assert report.trainable_params_by_block["mamba"] > 0 and report.global_step == 6
    assert report.eval_loss_final < report.eval_loss_initial  # the answer-token loss moved
    history = (tmp_path / "reports" / "train_history.csv").read_text().splitlines()
    assert history[0] == "step,train_loss,eval_loss,learning_rate,grad_norm"
    assert [line.split(",")[0] for line in history[1:] if line.split(",")[2]] == ["0", "3", "6"]  # eval rows
    assert (tmp_path / "reports" / "plots" / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "outputs" / "adapter" / "medlora_base.json").exists()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(report.mlflow_run_id)
    assert run.data.tags["params_hash"] == params.params_hash()
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "train/train.json", str(tmp_path))).read_text())
    assert logged == report.to_dict()  # the run carries the very report the stage writes
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 3, 6]
    for metric in ("learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb"):
        assert client.get_metric_history(run.info.run_id, metric), metric


def test_absurd_learning_rate_stops_training_with_the_common_issues_fix(tmp_path, tiny_base_dir, formatted_dir):
    from medlora.training.monitoring import TrainingHealthError
    from medlora.training.train import run as train

    params = stage_params(tmp_path, tiny_base_dir, formatted_dir, learning_rate=1e4, max_steps=12, warmup_steps=0)
    with pytest.raises(TrainingHealthError, match=r"Loss explodes.*reduce train\.learning_rate by 10x"):
        train(params)
    assert not (tmp_path / "outputs" / "adapter").exists()


def test_target_list_without_mamba_fails_before_training(tmp_path, tiny_base_dir, formatted_dir):
    from medlora.training.train import run as train

    lora = {"target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}
    with pytest.raises(
        CoverageError, match="no trainable parameters to mamba blocks; NemotronH's Mamba projection"
    ) as e:
        train(stage_params(tmp_path, tiny_base_dir, formatted_dir, lora=lora))
    report = e.value.report  # the stage script writes it (run_stage)
    assert report.coverage["passed"] is False and report.coverage_passed is False
    assert report.coverage["missing"] == ["mamba", "moe_shared_expert"]
    assert not (tmp_path / "outputs" / "checkpoints").exists()


def run_stage(project: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "pipelines" / "train.py")],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )


@pytest.mark.slow
def test_sigkilled_training_resumes_from_its_last_checkpoint(tmp_path, tiny_base_dir, formatted_dir):
    params = stage_params(tmp_path, tiny_base_dir, formatted_dir, max_steps=30, save_steps=5, eval_steps=30)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    checkpoints = tmp_path / "outputs" / "checkpoints"

    first = run_stage(tmp_path, tmp_path / "first.log")
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob(f"checkpoint-*/{CHECKPOINT_MARK}")) and first.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, "training finished before it could be killed"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob(f"checkpoint-*/{CHECKPOINT_MARK}"))
    assert killed_at < 30 and not (tmp_path / "outputs" / "adapter").exists()
    first_run = json.loads((checkpoints / f"checkpoint-{killed_at}" / CHECKPOINT_MARK).read_text())

    second = run_stage(tmp_path, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"resumed from checkpoint {checkpoints / f'checkpoint-{killed_at}'} (global step {killed_at})" in log
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["resumed_from_step"] == killed_at and report["global_step"] == 30
    assert report["steps_this_run"] == 30 - killed_at  # continued, not restarted
    assert report["mlflow_run_id"] == first_run["mlflow_run_id"]  # the same pipeline run in MLflow
    steps = [int(line.split(",")[0]) for line in (tmp_path / "reports" / "train_history.csv").read_text().split()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one history across the kill


@pytest.mark.unsloth
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth: make unsloth-test")
def test_unsloth_backend_trains_the_tiny_model_on_cpu(tmp_path, tiny_base_dir, formatted_dir):
    # In a fresh process: unsloth must be imported before transformers, which this test process already did.
    params = stage_params(tmp_path, tiny_base_dir, formatted_dir, backend="unsloth", max_steps=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    process = run_stage(tmp_path, tmp_path / "unsloth.log")
    assert process.wait(timeout=600) == 0, (tmp_path / "unsloth.log").read_text()[-3000:]
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["backend"] == "unsloth" and report["coverage"]["passed"]
    assert report["coverage"]["gradient_check"]["passed"] and report["global_step"] == 6
    assert report["eval_loss_final"] < report["eval_loss_initial"]
    assert (tmp_path / "outputs" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_agrees_across_ranks_and_saves_one_adapter(tmp_path, tiny_base_dir, formatted_dir):
    # The same `accelerate launch` a multi-GPU user runs, over gloo on 2 CPU processes (configs/accelerate/).
    params = stage_params(tmp_path, tiny_base_dir, formatted_dir, max_steps=4, save_steps=100, eval_steps=100)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(PROJECT_ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"),
        str(PROJECT_ROOT / "pipelines" / "train.py"),
    ]  # fmt: skip
    result = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    ddp = report["distributed"]
    assert ddp["world_size"] == 2 and len(ddp["adapter_checksums"]) == 2
    assert ddp["ranks_agree"] and ddp["adapter_checksums"][0] == pytest.approx(ddp["adapter_checksums"][1])
    adapters = [p for p in tmp_path.rglob("adapter_model.safetensors") if "checkpoints" not in p.parts]
    assert adapters == [tmp_path / "outputs" / "adapter" / "adapter_model.safetensors"]
    assert not list(tmp_path.rglob("*.partial"))

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["medlora"])
    assert len(runs) == 1, "only the main process may open the pipeline's MLflow run"


def flattened_examples_leak(model, examples) -> float:
    """Max logit difference between examples run one by one and flattened into one row with restarting positions."""
    flat = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    with torch.no_grad():
        together = model(input_ids=flat, position_ids=positions).logits[0]
        apart = torch.cat([model(input_ids=e[None]).logits[0] for e in examples])
    return float((together - apart).abs().max())


def test_padding_free_is_used_only_where_flattened_examples_stay_apart(tiny_base_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from medlora.training.backends import padding_free_supported

    torch.manual_seed(0)
    examples = [torch.randint(5, 400, (n,)) for n in (7, 12, 5)]
    nemotron = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=445, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    # Measured on this CPU: neither the Mamba reference scan nor sdpa keeps flattened examples apart ...
    assert flattened_examples_leak(nemotron, examples) > 1e-3
    assert flattened_examples_leak(llama, examples) > 1e-3
    assert not padding_free_supported("nemotron_h", nemotron.config._attn_implementation, has_gpu=False)
    assert not padding_free_supported("llama", llama.config._attn_implementation, has_gpu=False)
    # ... so padding-free is chosen only with flash attention on a GPU (and mamba_ssm for NemotronH).
    assert padding_free_supported("llama", "flash_attention_2", has_gpu=True)
    assert padding_free_supported("nemotron_h", "flash_attention_2", has_gpu=True) == (
        importlib.util.find_spec("mamba_ssm") is not None
    )
    args = sft_config(TrainConfig(), "unused", has_gpu=False, model_config=nemotron.config)
    assert args.padding_free is False and args.train_sampling_strategy == "group_by_length"
