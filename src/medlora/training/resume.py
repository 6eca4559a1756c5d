"""Resuming a killed train stage: which checkpoint (if any) may be continued, and marking checkpoints complete.

A checkpoint is resumable only when it was written by the same params, the same inputs (formatted rows, base
reference) and the same training code, and it is complete: the callback marks it after trainer_state.json, the
last file the Trainer writes. "The same code" is the train stage's import closure, the very files dvc.yaml lists
for it (core/imports.py), so DVC and resume agree on when the code changed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.core.config import Params
from medlora.core.imports import PACKAGE_DIR, stage_code_files
from medlora.core.io import files_hash, read_json, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_MARK = "medlora_checkpoint.json"  # written into each checkpoint once it is complete
TRAIN_ENTRY = "medlora.training.train"


@dataclass(frozen=True)
class ResumePlan:
    """Where training starts: a checkpoint to continue (None: from scratch) and the MLflow run it belongs to."""

    checkpoint: Path | None
    run_id: str
    fingerprint: dict[str, str]

    @property
    def step(self) -> int | None:
        return checkpoint_step(self.checkpoint) if self.checkpoint else None


def training_fingerprint(params: Params, formatted_dir: str | Path, base_dir: str | Path) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the params hash and a hash of its inputs and training code."""
    inputs = [*sorted(Path(formatted_dir).glob("*.jsonl")), Path(base_dir) / "medlora_base.json"]
    code = stage_code_files(TRAIN_ENTRY)
    combined = hashlib.sha256((files_hash(inputs) + files_hash(code, PACKAGE_DIR)).encode()).hexdigest()
    return {"params_hash": params.params_hash(), "inputs_hash": combined[:16]}


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def find_resumable_checkpoint(
    checkpoints_dir: str | Path, fingerprint: dict[str, str], remove_stale: bool = True
) -> tuple[Path | None, str]:
    """(latest complete checkpoint written with this fingerprint, its MLflow run id) or (None, "").

    Checkpoints from other params or inputs are removed (when `remove_stale`), with a log line saying why we start
    fresh: they would confuse checkpoint rotation and a later resume.
    """
    root = Path(checkpoints_dir)
    candidates = sorted(root.glob("checkpoint-*"), key=checkpoint_step, reverse=True) if root.is_dir() else []
    for checkpoint in candidates:
        mark = checkpoint / CHECKPOINT_MARK
        if not mark.exists() or not (checkpoint / "trainer_state.json").exists():
            logger.info("ignoring incomplete checkpoint %s", checkpoint)
            continue
        saved = read_json(mark)
        if all(saved.get(key) == value for key, value in fingerprint.items()):
            return checkpoint, saved.get("mlflow_run_id", "")
        changed = [key for key, value in fingerprint.items() if saved.get(key) != value]
        logger.warning("checkpoint %s was written with other %s: starting fresh", checkpoint, " and ".join(changed))
        break
    for checkpoint in candidates if remove_stale else []:
        shutil.rmtree(checkpoint)
    return None, ""


def plan_resume(params: Params, remove_stale: bool) -> ResumePlan:
    """The checkpoint to continue from, if any. The last checkpoint of a finished run is not continued: resuming
    would train one step past max_steps, so a rerun of a finished run trains afresh in a new MLflow run."""
    paths = params.paths
    fingerprint = training_fingerprint(params, paths.formatted_dir, paths.base_model_dir)
    checkpoint, run_id = find_resumable_checkpoint(paths.checkpoints_dir, fingerprint, remove_stale=remove_stale)
    if checkpoint is not None and 0 < params.train.max_steps <= checkpoint_step(checkpoint):
        logger.info("checkpoint %s is from a finished run: training from the start, in a new MLflow run", checkpoint)
        checkpoint, run_id = None, ""
    return ResumePlan(checkpoint, run_id, fingerprint)


def mark_checkpoint_callback(fingerprint: dict[str, str], run_id: str) -> Any:
    """A callback that marks each saved checkpoint complete and resumable with this fingerprint."""
    from transformers import TrainerCallback  # heavy: only the train stage needs it

    class MarkCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_json(checkpoint / CHECKPOINT_MARK, {**fingerprint, "mlflow_run_id": run_id})
            return control

    return MarkCheckpoint()
