"""The `train` stage's verb: LoRA on the base model, gated, tracked, resumable (backends.py holds the backends).

    report = run(params)   # pipelines/train.py

`run` is a short sequence:
1. resume planning (resume.py): continue the last complete checkpoint written by the same params, inputs and code;
2. the model with LoRA through the chosen backend, and the coverage gate (trainable parameters per block type);
3. the trainer (SFTTrainer on outputs/formatted, eval_loss on early_stop.jsonl) with its callbacks;
4. the tracked run: one MLflow run per pipeline run, reopened on resume, closed FAILED/KILLED on an error;
5. a pure summary of the trainer's state into reports/train.json; the adapter, the history CSV and the loss plot.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.contracts import TrainReport
from medlora.core.io import atomic_directory
from medlora.modeling import blocks
from medlora.modeling.base_model import model_type_of
from medlora.training import backends
from medlora.training.resume import ResumePlan, mark_checkpoint_callback, plan_resume

logger = logging.getLogger(__name__)


def save_adapter(model: Any, tokenizer: Any, base_dir: str | Path, adapter_dir: str | Path) -> None:
    """outputs/adapter: safetensors adapter + tokenizer + a copy of medlora_base.json, renamed into place."""
    with atomic_directory(adapter_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.copy2(Path(base_dir) / "medlora_base.json", staging / "medlora_base.json")
    logger.info("adapter written to %s", adapter_dir)


def gated_model(params: Params, backend: str, has_gpu: bool, plan: ResumePlan) -> tuple[Any, Any, TrainReport]:
    """(PEFT model, tokenizer, the report so far) after the coverage gate; raises CoverageError (with the report)
    when a required block type gets no trainable parameters."""
    # coverage and monitoring import transformers: only after backends.resolve_backend (unsloth patches it first).
    from medlora.training import coverage

    if params.train.gpu_memory or has_gpu:  # on a GPU its memory is read from torch when not declared
        refuse_if_over_memory(params)
    if has_gpu:  # before any weights are loaded: 60 GB later is the wrong moment to learn a kernel is missing
        backends.check_gpu_requirements(params.train, model_type_of(params.paths.base_model_dir), has_gpu)
    model, tokenizer = backends.load_peft_model(
        backend, params.paths.base_model_dir, params.lora, params.train, has_gpu, params.format.max_length
    )
    counts = blocks.trainable_params_by_block(model)
    verdict = coverage.check_coverage(
        counts, params.lora.required_blocks, blocks.params_by_block(model), params.lora.target_modules
    )
    report = TrainReport(
        backend=backend,
        batching=backends.batching(params.train, model.config, has_gpu),
        trainable_params_by_block=counts,
        trainable_params=sum(counts.values()),
        total_params=sum(p.numel() for p in model.parameters()),
        coverage=verdict.to_dict(),
        **plan.fingerprint,
    )
    logger.info("backend %s; %s; trainable parameters by block: %s", backend, report.batching, counts)
    coverage.require_coverage(verdict, report)
    logger.info("coverage gate: %s", verdict.message)
    return model, tokenizer, report


def build_trainer(params: Params, backend: str, has_gpu: bool, model: Any, tokenizer: Any, callbacks: list) -> Any:
    """SFTTrainer (or its CPU subclass) on the formatted rows, params.train as SFTConfig."""
    formatted = Path(params.paths.formatted_dir)
    return backends.sft_trainer_class(backend, has_gpu)(
        model=model,
        args=backends.sft_config(params.train, params.paths.checkpoints_dir, has_gpu, model.config),
        train_dataset=backends.load_formatted(formatted / "train.jsonl"),
        eval_dataset=backends.load_formatted(formatted / "early_stop.jsonl"),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def summarize_state(
    report: TrainReport, state: Any, plan: ResumePlan, seconds: float, start_tokens: int, has_gpu: bool
) -> TrainReport:
    """The report after training, from the trainer's state alone (pure but for the peak-memory reading)."""
    # coverage and monitoring import transformers: only after backends.resolve_backend (unsloth patches it first).
    from medlora.training import monitoring

    evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
    trains = [e["loss"] for e in state.log_history if "loss" in e]
    tokens = state.num_input_tokens_seen - start_tokens  # non-padding tokens trained on in this process
    return dataclasses.replace(
        report,
        global_step=state.global_step,
        resumed_from_step=plan.step,
        steps_this_run=state.global_step - (plan.step or 0),
        train_loss=trains[-1] if trains else None,
        eval_loss_initial=evals[0] if evals else None,
        eval_loss_final=evals[-1] if evals else None,
        train_seconds=round(seconds, 2),  # this process's trainer.train(), periodic evals included
        train_tokens=tokens,
        tokens_per_second=round(tokens / seconds, 1),
        peak_memory_mb=round(monitoring.peak_memory_mb(), 1),
        device="cuda" if has_gpu else "cpu",
    )


def run(params: Params) -> TrainReport:
    """Run the train stage with `params`; returns the report (the stage script writes reports/train.json).

    Raises CoverageError (gate or gradient check), TrainingHealthError (NaN/exploding loss), UnslothUnavailable,
    or ValueError for bad params/inputs; the MLflow run is then marked FAILED (KILLED on Ctrl-C).
    """
    backend = backends.resolve_backend(params.train.backend)  # before transformers: unsloth patches it on import
    import mlflow  # heavy imports after resolve_backend, for the same reason
    import torch
    from accelerate import PartialState

    from medlora.training import coverage, monitoring

    # Under `accelerate launch` every rank runs this function; only the main process owns the MLflow run,
    # the checkpoint marks, the adapter and the reports (the others would race it for the same files).
    has_gpu = torch.cuda.is_available()
    # cpu=True on a CPU machine: with torchrun's env that makes it gloo DDP (MULTI_CPU) instead of one process
    # that ignores its siblings. The Trainer's Accelerator reuses this shared state.
    distributed = PartialState(cpu=not has_gpu)
    is_main = distributed.is_main_process
    plan = plan_resume(params, remove_stale=is_main)
    distributed.wait_for_everyone()  # no rank may look at checkpoints while the main one removes stale ones
    model, tokenizer, report = gated_model(params, backend, has_gpu, plan)

    run_ = open_run(params, plan.run_id) if is_main else None
    report = dataclasses.replace(report, mlflow_run_id=run_.info.run_id if run_ else None)
    if run_:
        mlflow.log_dict(report.to_dict(), "train/coverage.json")
    targeted = [block for block, count in report.trainable_params_by_block.items() if count and block != "other"]
    gradients = coverage.GradientCoverageCallback(targeted)
    callbacks = [
        monitoring.TrainingMonitor(params.train.learning_rate, params.train.loss_explosion_factor, is_main),
        gradients,
    ] + ([mark_checkpoint_callback(plan.fingerprint, run_.info.run_id)] if run_ else [])
    reports = Path(params.paths.reports_dir)
    trainer = None
    try:
        trainer = build_trainer(params, backend, has_gpu, model, tokenizer, callbacks)
        if plan.checkpoint is not None:
            logger.info("resumed from checkpoint %s (global step %d)", plan.checkpoint, plan.step)
        start, start_tokens = time.monotonic(), trainer.state.num_input_tokens_seen
        trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
        seconds = time.monotonic() - start
        report = dataclasses.replace(report, distributed=ranks_agreement(trainer.model, distributed))
        if is_main:
            save_adapter(trainer.model, tokenizer, params.paths.base_model_dir, params.paths.adapter_dir)
    except BaseException as error:
        if trainer is not None and is_main:
            write_history_and_plot(trainer.state.log_history, reports)
        if isinstance(error, torch.OutOfMemoryError):
            error.add_note(
                "Common Issues: 'OOM errors' -> reduce train.per_device_train_batch_size, increase "
                "train.gradient_accumulation_steps (or turn on train.gradient_checkpointing)"
            )
        if run_:
            mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if not is_main:
        return report
    report = summarize_state(report, trainer.state, plan, seconds, start_tokens, has_gpu)
    gradient_verdict = gradients.verdict.to_dict() if gradients.verdict else None
    passed = report.coverage["passed"] and (gradients.verdict is None or gradients.verdict.passed)
    report = dataclasses.replace(
        report, coverage={**report.coverage, "gradient_check": gradient_verdict, "passed": passed}
    )
    log_run(report, reports, trainer.state.log_history)
    return report


def log_run(report: TrainReport, reports: Path, log_history: list[dict[str, Any]]) -> None:
    """History CSV and loss plot, then the report, the history and the plot into the MLflow run, which it closes."""
    import mlflow

    write_history_and_plot(log_history, reports)
    losses = {"eval_loss_initial": report.eval_loss_initial, "eval_loss_final": report.eval_loss_final}
    mlflow.log_metrics({key: float(value) for key, value in losses.items() if value is not None})
    mlflow.log_dict(report.to_dict(), f"train/{report.FILE}")
    for name in ("train_history.csv", "plots/train_loss.png"):
        mlflow.log_artifact(str(reports / name), artifact_path="train")
    mlflow.end_run()


def refuse_if_over_memory(params: Params) -> None:
    """Before loading any weights: stop when `medlora plan`'s estimate exceeds the declared `train.gpu_memory`."""
    from medlora.modeling.planning import check_fits, plan

    estimate = plan(params)
    gpu_gib, source = estimate["gpu"]["memory_gib"], estimate["gpu"]["source"]
    if gpu_gib is None:
        return
    check_fits(estimate, gpu_gib, params.train.gradient_checkpointing)
    logger.info("memory plan fits the GPU's %.1f GiB (%s)", gpu_gib, source)


def ranks_agreement(model: Any, distributed: Any) -> dict[str, Any]:
    """Every rank's checksum of its trained adapter weights, gathered: DDP must leave them identical."""
    import torch
    from accelerate.utils import gather_object

    with torch.no_grad():
        checksum = sum(float(p.detach().double().abs().sum()) for n, p in model.named_parameters() if p.requires_grad)
    checksums = gather_object([checksum]) if distributed.num_processes > 1 else [checksum]
    agree = max(checksums) - min(checksums) <= 1e-6 * max(1.0, abs(checksums[0]))
    if not agree:
        raise RuntimeError(f"DDP ranks disagree on the trained adapter weights (checksums {checksums})")
    return {"world_size": distributed.num_processes, "adapter_checksums": checksums, "ranks_agree": agree}


def open_run(params: Params, run_id: str) -> Any:
    """Reopen the MLflow run a resumed checkpoint belongs to (one run per pipeline run), else start one."""
    from mlflow.exceptions import MlflowException

    from medlora.core import tracking

    if run_id:
        try:
            return tracking.resume_pipeline_run(params, run_id)
        except MlflowException as error:
            logger.warning("cannot reopen MLflow run %s (%s): starting a new run", run_id, error)
    # Named for a person comparing runs in the UI: the DVC experiment's name, else the params that differ.
    return tracking.start_pipeline_run(params, tracking.run_name(params))


def write_history_and_plot(log_history: list[dict[str, Any]], reports: Path) -> None:
    # coverage and monitoring import transformers: only after backends.resolve_backend (unsloth patches it first).
    from medlora.training import monitoring

    rows = monitoring.history_rows(log_history)
    monitoring.write_history(rows, reports / "train_history.csv")
    monitoring.plot_losses(rows, reports / "plots" / "train_loss.png")
