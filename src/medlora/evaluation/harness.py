"""The `evaluate` stage's verb: lm-evaluation-harness on the validation split, base against adapter against merged.

Scoring is the harness's own (`lm_eval.simple_evaluate`), never re-implemented here. The project's tasks live in
`lm_eval_tasks/` and are registered with `TaskManager(include_path=..., include_defaults=False)` (the default
index of ~15k tasks costs ~11 s); the run-time inputs (the validation file, the tokenizer with its chat template,
the system prompt) reach them as TaskManager metadata. This module turns the harness's results and per-sample
logs into `reports/eval.json` (per model and task figures, per-subject accuracy, the `gate` object), writes the
samples to `outputs/eval/`, draws the subject plot and logs it all to the pipeline's MLflow run.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from medlora.core.config import EvaluateConfig, Params
from medlora.core.contracts import EvalReport, StageFailed
from medlora.core.hub import hub_offline
from medlora.core.io import read_json
from medlora.evaluation.report import METRICS, build_report, log_to_mlflow, plot_subject_accuracy, write_samples
from medlora.modeling.base_model import BASE_REFERENCE_FILE, read_base_reference, weights_location
from medlora.modeling.presets import get_preset

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_TASKS: tuple[str, ...] = ("medmcqa_local", "medmcqa_chat", "medmcqa_chat_loglik")
HUB_TASK = "medmcqa"  # lm-eval's built-in task (hub data), run when evaluate.source is hub
MODELS: tuple[str, ...] = ("base", "adapter", "merged")
# vLLM accepts only these LoRA ranks as max_lora_rank: round the adapter's r up to the next one.
VLLM_LORA_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 320, 512)


class EvaluationError(StageFailed):
    """The evaluation cannot run as configured; the message says what is missing and what to do."""


class _DropMetadataHint(logging.Filter):
    """lm-eval warns on every `custom_dataset` load that kwargs can come from `--metadata`: here they always do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropMetadataHint())


def resolve_tasks(config: EvaluateConfig) -> list[str]:
    """The lm-eval task names to run: `evaluate.tasks`, with the built-in `medmcqa` for medmcqa_local on the hub."""
    tasks = [HUB_TASK if config.source == "hub" and task == "medmcqa_local" else task for task in config.tasks]
    unknown = [task for task in tasks if task not in (*LOCAL_TASKS, HUB_TASK)]
    if unknown or not tasks:
        raise EvaluationError(f"evaluate.tasks: unknown task(s) {unknown} (known: {', '.join(LOCAL_TASKS)})")
    return tasks


def resolve_primary_metric(params: Params, tasks: list[str]) -> str:
    """The "task/metric" the gate reads: `evaluate.primary_metric`, or the preset's when it says "auto"."""
    metric = params.evaluate.primary_metric
    if metric == "auto":
        metric = get_preset(params.model.preset).primary_metric
    task, _, name = metric.partition("/")
    if params.evaluate.source == "hub" and task == "medmcqa_local":
        task = HUB_TASK
    if task not in tasks or name not in METRICS:
        raise EvaluationError(
            f"evaluate.primary_metric {metric!r}: expected task/metric with a task in {tasks} and a metric in "
            f"{list(METRICS)}"
        )
    return f"{task}/{name}"


def pinned_hub_task_dir(revision: str | None) -> Path:
    """A folder holding lm-eval's built-in `medmcqa` task with the dataset revision pinned (`dataset_kwargs`).

    The built-in task loads `openlifescienceai/medmcqa` at whatever the hub's main branch is that day; a number in a
    report needs the data it was computed on, so the task is included unchanged and only the revision is added.
    """
    builtin = Path(importlib.util.find_spec("lm_eval.tasks").origin).parent / HUB_TASK / f"{HUB_TASK}.yaml"
    folder = Path(tempfile.mkdtemp(prefix="medlora-lm-eval-"))
    config = {"task": HUB_TASK, "include": str(builtin), "dataset_kwargs": {"revision": revision}}
    (folder / f"{HUB_TASK}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder


def build_task_manager(
    tasks: list[str],
    validation_file: str | Path,
    tokenizer_dir: str | Path,
    system_prompt: str,
    hub_revision: str | None = None,
):
    """A TaskManager indexing only the project's tasks (plus the built-in `medmcqa`, pinned, when it is asked)."""
    from lm_eval.tasks import TaskManager

    include = [str(TASKS_DIR)]
    if HUB_TASK in tasks:
        if not hub_revision:
            raise EvaluationError("evaluate.source: hub needs snapshot.revision (a dataset commit) to pin the data")
        include.append(str(pinned_hub_task_dir(hub_revision)))
    metadata = {
        "validation_file": str(Path(validation_file).resolve()),
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "system_prompt": system_prompt,
    }
    return TaskManager(include_path=include, include_defaults=False, metadata=metadata)


def check_vocab_fits(tokenizer_dir: str | Path, location: str, revision: str | None) -> None:
    """lm-eval resizes the embeddings when the tokenizer is longer than the model's vocabulary, silently scoring a
    different model: refuse instead, naming both sizes."""
    from transformers import AutoConfig, AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    vocab = AutoConfig.from_pretrained(location, revision=revision).vocab_size
    if tokens > vocab:
        raise EvaluationError(
            f"the tokenizer in {tokenizer_dir} has {tokens} tokens but {location} embeds only {vocab}: lm-eval would "
            "resize the embeddings and score another model; use the tokenizer the model was trained with"
        )


def preflight_tasks(task_manager: Any, tasks: list[str]) -> dict[str, int]:
    """Load every task once (data, tokenizer) before any model is loaded; returns questions per task.

    Raises EvaluationError naming the task, e.g. the hub task without network or with HF_HUB_OFFLINE set.
    """
    counts = {}
    for task in tasks:
        try:
            loaded = task_manager.load([task])["tasks"][task]
        except Exception as error:  # datasets/hub/file errors all mean: this task cannot run here
            hint = ""
            if task == HUB_TASK:
                state = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if hub_offline() else "the download failed"
                hint = (
                    f" lm-eval's built-in {HUB_TASK} downloads openlifescienceai/medmcqa from the hub and {state};"
                    " give the machine network access (unset HF_HUB_OFFLINE), or set evaluate.source: local."
                )
            message = f"evaluate: task {task} cannot be loaded ({type(error).__name__}: {error}).{hint}"
            raise EvaluationError(message) from error
        counts[task] = len(loaded.eval_docs)
    return counts


def check_backend_available(backend: str) -> None:
    """vLLM needs the `vllm` package and a GPU; say so before any model is loaded."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EvaluationError(
            "evaluate.backend: vllm needs the `vllm` package (pip install 'lm-eval[vllm]') and a CUDA GPU; "
            "use evaluate.backend: hf on this machine"
        )


def require_file(path: Path, stage: str) -> Path:
    if not path.exists():
        raise EvaluationError(f"{path} is missing: run the {stage} stage first")
    return path


def adapter_rank(adapter_dir: str | Path) -> int:
    return int(read_json(require_file(Path(adapter_dir) / "adapter_config.json", "train"))["r"])


def check_adapter_base(adapter_dir: str | Path, base_dir: str | Path) -> None:
    """An adapter evaluated on another base than the one it was trained on gives meaningless numbers."""
    copied = Path(adapter_dir) / BASE_REFERENCE_FILE
    if not copied.exists():
        return
    trained_on, base = read_json(copied), read_base_reference(base_dir)
    keys = ("preset", "name_or_path", "revision", "weights_sha256")
    if any(trained_on.get(key) != base.get(key) for key in keys):
        raise EvaluationError(
            f"{copied} names another base ({[trained_on.get(k) for k in keys]}) than {base_dir} "
            f"({[base.get(k) for k in keys]}): rerun the train stage on this base"
        )


def model_arguments(model: str, params: Params) -> tuple[str, dict[str, Any]]:
    """(lm-eval model type, model_args) for one of base, adapter, merged under `evaluate.backend`.

    Raises EvaluationError for an unknown model, a missing adapter or merged model, or an adapter trained on
    another base. Needs neither vLLM nor a GPU (the vLLM arguments are built here, checked at run time).
    """
    paths = params.paths
    base_dir = Path(paths.base_model_dir).resolve()
    location, revision = weights_location(base_dir)
    args: dict[str, Any] = {"pretrained": location, "tokenizer": str(base_dir)}
    args["dtype"] = read_base_reference(base_dir)["torch_dtype"]
    if revision:
        args["revision"] = revision
    adapter_dir = str(Path(paths.adapter_dir).resolve())
    if model == "adapter":
        require_file(Path(adapter_dir) / "adapter_config.json", "train")
        check_adapter_base(adapter_dir, base_dir)
    elif model == "merged":
        args["pretrained"] = str(require_file(Path(paths.merged_dir).resolve() / "config.json", "merge").parent)
        args.pop("revision", None)
    elif model != "base":
        raise EvaluationError(f"evaluate.models: unknown model {model!r} (known: {', '.join(MODELS)})")
    if params.evaluate.backend == "vllm":
        if model == "adapter":
            rank = adapter_rank(adapter_dir)
            max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
            args |= {"enable_lora": True, "lora_local_path": adapter_dir, "max_lora_rank": max_rank}
        return "vllm", args
    import torch

    args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "adapter":
        args["peft"] = adapter_dir
    return "hf", args


def run_harness(lm_type: str, args: dict[str, Any], tasks: list[str], task_manager: Any, config: EvaluateConfig):
    """One `lm_eval.simple_evaluate` call (per-sample logs on); returns the harness's results dict."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm_type,
        model_args=args,
        tasks=tasks,
        task_manager=task_manager,
        batch_size=config.batch_size,
        limit=config.limit,
        log_samples=True,
        apply_chat_template=False,  # the chat tasks apply the template themselves, exactly as training did
    )


def run(params: Params) -> EvalReport:
    """Run every model in `evaluate.models` through the harness; write outputs/eval and the subject plot, log the
    figures to the pipeline's MLflow run.

    Returns the report. Raises EvaluationError (before loading any model) when a task, the backend or an input
    is not available.
    """
    started_stage = time.perf_counter()
    config, paths = params.evaluate, params.paths
    tasks = resolve_tasks(config)
    primary = resolve_primary_metric(params, tasks)
    validation_file = Path(paths.validated_dir) / "validation.jsonl"
    if not validation_file.exists():
        raise EvaluationError(f"{validation_file} is missing: run the validate stage first")
    check_backend_available(config.backend)
    arguments = {model: model_arguments(model, params) for model in config.models}
    for _, args in arguments.values():
        check_vocab_fits(args.get("tokenizer", paths.base_model_dir), args["pretrained"], args.get("revision"))
    manager = build_task_manager(
        tasks, validation_file, paths.base_model_dir, params.format.system_prompt, params.snapshot.revision
    )
    counts = preflight_tasks(manager, tasks)
    logger.info("evaluating %s on %s (questions per task: %s, limit %s)", list(arguments), tasks, counts, config.limit)
    runs: dict[str, dict[str, Any]] = {}
    for number, (model, (lm_type, args)) in enumerate(arguments.items(), start=1):
        started = time.perf_counter()
        results = run_harness(lm_type, args, tasks, manager, config)
        seconds = round(time.perf_counter() - started, 2)
        runs[model] = {"results": results, "model_args": args, "wall_seconds": seconds}
        logger.info("model %d/%d %s evaluated in %.1f s", number, len(arguments), model, seconds)
    report = build_report(params, tasks, primary, runs, wall_seconds=time.perf_counter() - started_stage)
    write_samples(paths.eval_dir, tasks, runs)
    plot = plot_subject_accuracy(report, Path(paths.reports_dir) / "plots" / "subject_accuracy.png")
    log_to_mlflow(params, report, plot)
    return report
