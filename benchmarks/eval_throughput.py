"""Evaluation throughput: the evaluate stage's lm-eval run on 4,183 questions (MedMCQA's validation split size).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_throughput.py [--questions 4183] [--sweep-questions 96]
        [--batch-sizes 1 4 8 16 32 64] [--rounds 2] [--model adapter] [--source synthetic|shared] [--threads 1]
        [--keep DIR]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_throughput.py --smoke --keep /tmp/bench   # 8 questions

`--smoke` is a tiny run for tests: 8 questions, a 4-question sweep of batch sizes 1 and 4, one round (each of
those can still be given).

Builds in a temp dir what the stage reads, with the tiny preset: a synthetic snapshot (`medlora.data.synthetic`, the
validation split scaled up to 4,183 rows or `--questions`; `--source shared` takes the real dev split from
../shared/medmcqa/dev.jsonl instead), a tiny NemotronH base (`build_base_model`, tokenizer trained on the train
split) and a random-init LoRA adapter with params.yaml's `lora` rank and targets. Every timed call goes through
`medlora.evaluation.harness` (`build_task_manager`, `model_arguments`, `run_harness` = `lm_eval.simple_evaluate`), so
the scoring is the stage's own.

1. Sweep: each batch size runs every task of `evaluate.tasks` on the first `--sweep-questions` questions in one
   harness call, as the stage does per model; `--rounds` passes, alternating the order (2 shared cores drift,
   FINDINGS), best of rounds counts. The metrics must agree across batch sizes (batching changes speed only).
2. Full run: the best batch size, each task on all 4,183 questions in its own call (per-task timing).

Progress (a line per harness call with its questions/s, lm-eval's request bars) goes to stderr; stdout gets the
sweep and per-task tables, then its last line is one JSON object with `questions`, `seconds` (sum of the
per-task calls, one model), `questions_per_s`, `batch_size`, per-task figures and the sweep's per-batch-size
figures. Model load, task load (the chat tasks render every row with the chat template) and lm-eval's own set-up
are inside each call's seconds, as they are in the stage; the stage repeats all of it for each of its models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DEV = PROJECT_ROOT.parent / "shared" / "medmcqa" / "dev.jsonl"
QUESTIONS = 4_183  # MedMCQA's validation (dev) split
SMOKE = {"questions": 8, "sweep_questions": 4, "batch_sizes": [1, 4], "rounds": 1}
FULL = {"questions": QUESTIONS, "sweep_questions": 96, "batch_sizes": [1, 4, 8, 16, 32, 64], "rounds": 2}
METRIC_TOLERANCE = 1e-4  # loglik sums differ by ~1e-7 between batch sizes (float summation order)

log = logging.getLogger("benchmark")


def build_inputs(work: Path, params: Any, source: str, model: str, questions: int) -> dict[str, Any]:
    """outputs/{validated/validation.jsonl, base_model, adapter[, merged]} under `work`; returns set-up facts."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medlora.core.io import write_jsonl
    from medlora.data.schema import read_jsonl_rows
    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import BASE_REFERENCE_FILE, build_base_model, load_base_model

    started = time.perf_counter()
    snap = params.snapshot
    splits = generate_splits(snap.seed, snap.train_size, questions, 0)
    validation = read_jsonl_rows(SHARED_DEV)[:questions] if source == "shared" else splits["validation"]
    outputs = work / "outputs"
    write_jsonl(outputs / "validated" / "validation.jsonl", validation)
    build_base_model(params.model, splits["train"], outputs / "base_model")
    base, tokenizer = load_base_model(outputs / "base_model")
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter changes outputs (a zero B could be skipped).
    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.lora_alpha,
        target_modules=list(params.lora.target_modules),
        init_lora_weights=False,
    )
    adapted = get_peft_model(base, lora)
    adapted.save_pretrained(outputs / "adapter")
    tokenizer.save_pretrained(outputs / "adapter")
    shutil.copy(outputs / "base_model" / BASE_REFERENCE_FILE, outputs / "adapter" / BASE_REFERENCE_FILE)
    if model == "merged":
        adapted.merge_and_unload().save_pretrained(outputs / "merged")
        tokenizer.save_pretrained(outputs / "merged")
    seconds = time.perf_counter() - started
    log.info("inputs: %d %s validation rows, tiny base + LoRA r=%d in %.1f s", len(validation), source, lora.r, seconds)
    return {"rows": len(validation), "setup_seconds": round(seconds, 1)}


def write_slice(work: Path, questions: int) -> Path:
    """The first `questions` validation rows in their own file, so sweep calls do not load all the rows."""
    from medlora.core.io import write_jsonl
    from medlora.data.schema import read_jsonl_rows

    path = work / "sweep" / "validation.jsonl"
    write_jsonl(path, read_jsonl_rows(work / "outputs" / "validated" / "validation.jsonl")[:questions])
    return path


def project_params(work: Path) -> Any:
    """params.yaml with every path pointing into `work`."""
    from medlora.core.config import parse_params

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["paths"] = {key: str(work / value) for key, value in raw["paths"].items()}
    return parse_params(raw)


def time_call(params: Any, model: str, tasks: list[str], validation: Path, batch_size: int) -> dict[str, Any]:
    """One `run_harness` call (the stage's) on every row of `validation`; seconds, questions and metrics per task.

    Raises RuntimeError when the harness scored another number of questions than the file holds.
    """
    from medlora.data.schema import read_jsonl_rows
    from medlora.evaluation import harness as evaluation

    config = dataclasses.replace(params.evaluate, batch_size=batch_size, limit=None)
    started = time.perf_counter()
    manager = evaluation.build_task_manager(tasks, validation, params.paths.base_model_dir, params.format.system_prompt)
    lm_type, args = evaluation.model_arguments(model, params)
    results = evaluation.run_harness(lm_type, args, tasks, manager, config)
    seconds = time.perf_counter() - started
    rows = len(read_jsonl_rows(validation))
    figures: dict[str, Any] = {}
    for task in tasks:
        samples = results["samples"][task]
        if len(samples) != rows:
            raise RuntimeError(f"{task}: the harness scored {len(samples)} questions, {validation} holds {rows}")
        metrics = {k.split(",")[0]: v for k, v in results["results"][task].items() if k.endswith(",none")}
        requests = sum(len(sample["arguments"]) for sample in samples)
        figures[task] = {"questions": rows, "requests": requests, "metrics": metrics}
    return {"seconds": seconds, "tasks": figures}


def metrics_agree(runs: list[dict[str, Any]]) -> bool:
    """Every run scored every task the same (within float noise): batch size changes speed, not results."""
    first = runs[0]["tasks"]
    return all(
        abs(run["tasks"][task]["metrics"][name] - value) <= METRIC_TOLERANCE
        for run in runs[1:]
        for task in first
        for name, value in first[task]["metrics"].items()
        if not name.endswith("_stderr")
    )


def sweep(params: Any, model: str, tasks: list[str], validation: Path, sizes: list[int], rounds: int) -> dict:
    """Questions/s of each batch size on the slice (all tasks in one call), best of `rounds` alternating passes."""
    questions = len(validation.read_text(encoding="utf-8").splitlines())
    time_call(params, model, tasks, validation, sizes[0])  # warm-up: first-call imports and caches, not timed
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    runs = []
    for number in range(rounds):
        for size in sizes if number % 2 == 0 else sizes[::-1]:
            run = time_call(params, model, tasks, validation, size)
            runs.append(run)
            seconds[size].append(round(run["seconds"], 2))
            log.info(
                "sweep round %d/%d batch %3d: %.2f s, %.1f questions/s (%d questions x %d tasks)",
                number + 1,
                rounds,
                size,
                run["seconds"],
                questions / run["seconds"],
                questions,
                len(tasks),
            )
    table = {size: {"seconds": s, "questions_per_s": round(questions / min(s), 2)} for size, s in seconds.items()}
    return {"questions": questions, "rounds": rounds, "by_batch_size": table, "metrics_agree": metrics_agree(runs)}


def print_tables(summary: dict[str, Any]) -> None:
    swept = summary["sweep"]
    print(f"sweep: {swept['questions']} questions x all tasks per call, best of {swept['rounds']} round(s)")
    print(f"{'batch':>6}{'questions/s':>13}  seconds per round")
    for size, figures in swept["by_batch_size"].items():
        print(f"{size:>6}{figures['questions_per_s']:>13.1f}  {figures['seconds']}")
    print(f"metrics agree across batch sizes: {swept['metrics_agree']}")
    print(f"full run, batch size {summary['batch_size']}, model {summary['model']}, {summary['source']} rows:")
    print(f"{'task':<22}{'questions':>10}{'requests':>10}{'seconds':>9}{'questions/s':>13}")
    for task, figures in summary["tasks"].items():
        print(
            f"{task:<22}{figures['questions']:>10}{figures['requests']:>10}{figures['seconds']:>9.1f}"
            f"{figures['questions_per_s']:>13.1f}"
        )
    print(
        f"{summary['questions']} questions x {len(summary['tasks'])} tasks in {summary['seconds']:.1f} s "
        f"({summary['questions_per_s']:.1f} questions/s); batch size {summary['batch_size']} vs params.yaml's "
        f"{summary['params_batch_size']}: {summary['speedup_vs_params_batch_size']}x the questions/s (sweep)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=None, help=f"validation questions (default {QUESTIONS:,})")
    parser.add_argument("--sweep-questions", type=int, default=None, help="questions of the batch-size sweep (96)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 4 8 16 32 64")
    parser.add_argument("--rounds", type=int, default=None, help="sweep passes, best counts (default 2)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny run for tests: {SMOKE} unless given")
    parser.add_argument("--model", choices=["base", "adapter", "merged"], default="adapter")
    parser.add_argument("--source", choices=["synthetic", "shared"], default="synthetic")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: params.yaml evaluate.tasks")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (set before torch loads)")
    parser.add_argument("--keep", default=None, help="build the inputs in this directory and keep it")
    args = parser.parse_args()
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lm_eval", "transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.source == "shared" and not SHARED_DEV.exists():
        raise SystemExit(f"--source shared: {SHARED_DEV} is missing")
    started = time.perf_counter()
    work = Path(args.keep or tempfile.mkdtemp(prefix="medlora-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        torch.set_num_threads(args.threads)
        params = project_params(work)
        tasks = args.tasks or list(params.evaluate.tasks)
        setup = build_inputs(work, params, args.source, args.model, args.questions)
        validation = work / "outputs" / "validated" / "validation.jsonl"
        sizes = list(dict.fromkeys(args.batch_sizes))
        swept = sweep(params, args.model, tasks, write_slice(work, args.sweep_questions), sizes, args.rounds)
        table = swept["by_batch_size"]
        best = max(table, key=lambda size: table[size]["questions_per_s"])
        log.info("best batch size %d (%.1f questions/s on the slice); full run", best, table[best]["questions_per_s"])
        per_task = {}
        for task in tasks:
            run = time_call(params, args.model, [task], validation, best)
            figures = run["tasks"][task]
            per_task[task] = {
                "questions": figures["questions"],
                "seconds": round(run["seconds"], 2),
                "questions_per_s": round(figures["questions"] / run["seconds"], 2),
                "requests": figures["requests"],
                "metrics": figures["metrics"],
            }
            log.info("full %s: %d questions in %.1f s", task, figures["questions"], run["seconds"])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = sum(figures["seconds"] for figures in per_task.values())
    default = params.evaluate.batch_size
    summary = {
        "questions": setup["rows"],
        "seconds": round(seconds, 2),
        "questions_per_s": round(setup["rows"] / seconds, 2),
        "batch_size": best,
        "model": args.model,
        "source": args.source,
        "threads": args.threads,
        "tasks": per_task,
        "params_batch_size": default,
        "speedup_vs_params_batch_size": round(table[best]["questions_per_s"] / table[default]["questions_per_s"], 2)
        if default in table
        else None,
        "sweep": swept,
        "setup_seconds": setup["setup_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print_tables(summary)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
