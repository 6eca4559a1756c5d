"""The `train` stage's verb: LoRA on the base model, gated, tracked, resumable; see backends.py for the backends.

    report = train(params)   # pipelines/train.py

1. choose the backend (`hf`, `unsloth`, `auto`) and load the base with LoRA;
2. the coverage gate: trainable parameters per block type, fail when a required type gets none;
3. SFTTrainer on outputs/formatted (eval_loss on early_stop.jsonl every eval_steps), with the monitor (MLflow
   metrics, progress, health), the gradient check at the first optimizer step, checkpoints every save_steps;
4. resume from the last checkpoint when it was written with the same params and inputs (after a kill);
5. adapter (safetensors + tokenizer + medlora_base.json), reports/train.json, train_history.csv, the loss plot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.imports import stage_code_files
from medlora.core.io import atomic_directory, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_MARK = "medlora_checkpoint.json"  # written into each checkpoint once it is complete


def training_fingerprint(params: Params, formatted_dir: str | Path, base_dir: str | Path) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the params hash and a hash of its inputs and training code."""
    digest = hashlib.sha256()
    # The training code is part of it: a checkpoint written by other code (a fixed loss, another collator) must not
    # be resumed as if nothing changed. DVC reruns the stage for the same reason.
    # The same files dvc.yaml lists for the stage (core/imports.py computes both from the import closure).
    code = stage_code_files("medlora.training.train")
    for path in [*sorted(Path(formatted_dir).glob("*.jsonl")), Path(base_dir) / "medlora_base.json", *code]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return {"params_hash": params.params_hash(), "inputs_hash": digest.hexdigest()[:16]}


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def find_resumable_checkpoint(
    checkpoints_dir: str | Path, fingerprint: dict[str, str], remove_stale: bool = True
) -> tuple[Path | None, str]:
    """(latest complete checkpoint written with this fingerprint, its MLflow run id) or (None, "").

    A checkpoint is complete once the callback marked it (after trainer_state.json, the last file written).
    Checkpoints from other params or inputs are removed, with a log line saying why we start fresh.
    """
    root = Path(checkpoints_dir)
    candidates = sorted(root.glob("checkpoint-*"), key=checkpoint_step, reverse=True) if root.is_dir() else []
    for checkpoint in candidates:
        mark = checkpoint / CHECKPOINT_MARK
        if not mark.exists() or not (checkpoint / "trainer_state.json").exists():
            logger.info("ignoring incomplete checkpoint %s", checkpoint)
            continue
        saved = json.loads(mark.read_text())
        if all(saved.get(key) == value for key, value in fingerprint.items()):
            return checkpoint, saved.get("mlflow_run_id", "")
        changed = [key for key, value in fingerprint.items() if saved.get(key) != value]
        logger.warning("checkpoint %s was written with other %s: starting fresh", checkpoint, " and ".join(changed))
        break
    for checkpoint in candidates if remove_stale else []:
        shutil.rmtree(checkpoint)  # stale: would confuse checkpoint rotation and a later resume
    return None, ""


def mark_checkpoint_callback(fingerprint: dict[str, str], run_id: str) -> Any:
    """A callback that marks each saved checkpoint complete and resumable with this fingerprint."""
    from transformers import TrainerCallback

    class MarkCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_json(checkpoint / CHECKPOINT_MARK, {**fingerprint, "mlflow_run_id": run_id})
            return control

    return MarkCheckpoint()


def save_adapter(model: Any, tokenizer: Any, base_dir: str | Path, adapter_dir: str | Path) -> None:
    """outputs/adapter: safetensors adapter + tokenizer + a copy of medlora_base.json, renamed into place."""
    with atomic_directory(adapter_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.copy2(Path(base_dir) / "medlora_base.json", staging / "medlora_base.json")
    logger.info("adapter written to %s", adapter_dir)


def train(params: Params) -> dict[str, Any]:
    """Run the train stage with `params`; returns the report also written to reports/train.json.

    Raises CoverageError (gate or gradient check), TrainingHealthError (NaN/exploding loss),
    UnslothUnavailable, or ValueError for bad params/inputs; the MLflow run is then marked FAILED.
    """
    from medlora.training.backends import (
        batching,
        load_formatted,
        load_peft_model,
        resolve_backend,
        sft_config,
        sft_trainer_class,
    )

    backend = resolve_backend(params.train.backend)  # before transformers: unsloth patches it on import
    import mlflow
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
    paths = params.paths
    reports = Path(paths.reports_dir)
    formatted = Path(paths.formatted_dir)
    fingerprint = training_fingerprint(params, formatted, paths.base_model_dir)
    checkpoint, run_id = find_resumable_checkpoint(paths.checkpoints_dir, fingerprint, remove_stale=is_main)
    distributed.wait_for_everyone()  # no rank may look at checkpoints while the main one removes stale ones
    if checkpoint is not None and 0 < params.train.max_steps <= checkpoint_step(checkpoint):
        # The last checkpoint of a finished run: resuming would train one step past max_steps.
        logger.info("checkpoint %s is from a finished run: training from the start, in a new MLflow run", checkpoint)
        checkpoint, run_id = None, ""

    if params.train.gpu_memory:
        refuse_if_over_memory(params)
    model, tokenizer = load_peft_model(backend, paths.base_model_dir, params.lora, params.train, has_gpu)
    counts = coverage.trainable_params_by_block(model)
    verdict = coverage.check_coverage(
        counts, params.lora.required_blocks, coverage.params_by_block(model), params.lora.target_modules
    )
    report: dict[str, Any] = {
        "backend": backend,
        "batching": batching(params.train, model.config, has_gpu),
        "trainable_params_by_block": counts,
        "trainable_params": sum(counts.values()),
        "total_params": sum(p.numel() for p in model.parameters()),
        "coverage": verdict.to_dict(),
        **fingerprint,
    }
    logger.info("backend %s; %s; trainable parameters by block: %s", backend, report["batching"], counts)
    if not verdict.passed:
        if is_main:
            write_json(reports / "train.json", report)
        coverage.require_coverage(verdict)
    logger.info("coverage gate: %s", verdict.message)

    run = open_run(params, run_id) if is_main else None
    report["mlflow_run_id"] = run.info.run_id if run else None
    if run:
        mlflow.log_dict(report, "train/coverage.json")
    targeted = [block for block, count in counts.items() if count and block != "other"]
    monitor = monitoring.TrainingMonitor(
        params.train.learning_rate, params.train.loss_explosion_factor, log_to_mlflow=is_main
    )
    gradients = coverage.GradientCoverageCallback(targeted)
    callbacks = [monitor, gradients] + ([mark_checkpoint_callback(fingerprint, run.info.run_id)] if run else [])
    trainer = None
    try:
        trainer = sft_trainer_class(backend, has_gpu)(
            model=model,
            args=sft_config(params.train, paths.checkpoints_dir, has_gpu, model.config),
            train_dataset=load_formatted(formatted / "train.jsonl"),
            eval_dataset=load_formatted(formatted / "early_stop.jsonl"),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if checkpoint is not None:
            logger.info("resumed from checkpoint %s (global step %d)", checkpoint, checkpoint_step(checkpoint))
        start, start_tokens = time.monotonic(), trainer.state.num_input_tokens_seen
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        seconds = time.monotonic() - start
        report["distributed"] = ranks_agreement(trainer.model, distributed)
        if is_main:
            save_adapter(trainer.model, tokenizer, paths.base_model_dir, paths.adapter_dir)
    except BaseException as error:
        if trainer is not None and is_main:
            write_history_and_plot(trainer.state.log_history, reports)
        if isinstance(error, torch.OutOfMemoryError):
            error.add_note(
                "Common Issues: 'OOM errors' -> reduce train.per_device_train_batch_size, increase "
                "train.gradient_accumulation_steps (or turn on train.gradient_checkpointing)"
            )
        if run:
            mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if not is_main:
        return report
    state = trainer.state
    evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
    trains = [e["loss"] for e in state.log_history if "loss" in e]
    resumed_from = checkpoint_step(checkpoint) if checkpoint else None
    report["coverage"]["gradient_check"] = gradients.verdict.to_dict() if gradients.verdict else None
    report["coverage"]["passed"] = verdict.passed and (gradients.verdict is None or gradients.verdict.passed)
    report.update(
        global_step=state.global_step,
        resumed_from_step=resumed_from,
        steps_this_run=state.global_step - (resumed_from or 0),
        train_loss=trains[-1] if trains else None,
        eval_loss_initial=evals[0] if evals else None,
        eval_loss_final=evals[-1] if evals else None,
        train_seconds=round(seconds, 2),  # this process's trainer.train(), periodic evals included
        train_tokens=state.num_input_tokens_seen - start_tokens,  # non-padding tokens trained on in this process
        tokens_per_second=round((state.num_input_tokens_seen - start_tokens) / seconds, 1),
        peak_memory_mb=round(monitoring.peak_memory_mb(), 1),
        device="cuda" if has_gpu else "cpu",
    )
    write_json(reports / "train.json", report)
    write_history_and_plot(state.log_history, reports)
    mlflow.log_metrics({k: float(report[k]) for k in ("eval_loss_initial", "eval_loss_final") if report[k] is not None})
    for name in ("train.json", "train_history.csv", "plots/train_loss.png"):
        mlflow.log_artifact(str(reports / name), artifact_path="train")
    mlflow.end_run()
    logger.info(
        "trained %d steps in %.1f s (%.0f tokens/s); eval loss %s -> %s; adapter in %s",
        report["steps_this_run"],
        seconds,
        report["tokens_per_second"],
        report["eval_loss_initial"],
        report["eval_loss_final"],
        paths.adapter_dir,
    )
    return report


def refuse_if_over_memory(params: Params) -> None:
    """Before loading any weights: stop when `medlora plan`'s estimate exceeds the declared `train.gpu_memory`."""
    from medlora.modeling.planning import check_fits, parse_memory, plan

    report = plan(params)
    check_fits(report, parse_memory(params.train.gpu_memory), params.train.gradient_checkpointing)
    logger.info("memory plan fits train.gpu_memory %s", params.train.gpu_memory)


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
    return tracking.start_pipeline_run(params, "train")


def write_history_and_plot(log_history: list[dict[str, Any]], reports: Path) -> None:
    from medlora.training.monitoring import history_rows, plot_losses, write_history

    rows = history_rows(log_history)
    write_history(rows, reports / "train_history.csv")
    plot_losses(rows, reports / "plots" / "train_loss.png")
