"""Training throughput of three batchings on MedMCQA-length examples: pad to max_length, TRL's default, ours.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py [--steps 32] [--eval-rows 96]
        [--batch-size 16] [--source auto|shared|stored] [--write-lengths] [--keep DIR]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py --smoke --keep /tmp/bench   # ~20 s

`--smoke` is a tiny run for tests: 2 steps of batch 4, 4 held-out examples, `--source stored` (each can still be
given); its ratios say little, they only show the three ways still train.

The same tiny NemotronH (`build_base_model` with params.yaml's `model` section, tokenizer trained on the synthetic
train split as in the default pipeline), the same LoRA initialisation (`backends.load_peft_model`, params.yaml's
`lora`), the same `--steps` x 16 (`--batch-size`, default params.yaml's) training examples (one epoch, every way
sees each example once), trained three ways:

- pad_to_max:  random batches, every one padded to max_length (SFTConfig `pad_to_multiple_of=max_length`);
- trl_default: random batches padded to their longest example (`train_sampling_strategy="random"`): what a user
               of TRL's SFTTrainer gets without us;
- project:     what `medlora.training.backends.sft_config` builds from params.yaml's `train` section (length-grouped
               batches, dynamic padding); the trainer class is `backends.sft_trainer_class`.

Only the batching differs; all three share params.yaml's `train` values, with eval/checkpoints off and max_steps
= --steps. Example lengths follow real MedMCQA: with ../shared/medmcqa/dev.jsonl present, its rows rendered by
`medlora.modeling.formatting` with `include_explanation=True` and truncated to max_length=1024 the way the format stage
does (`on_overflow: truncate`); else (or `--source stored`) synthetic rows trimmed/extended to lengths drawn from
the quantile table benchmarks/medmcqa_token_lengths.json (measured on the dev rows; `--write-lengths` rewrites it).

CPU timings on 2 shared cores drift (FINDINGS), so the three trainers run in one process in lockstep: each in its
own thread, one optimizer step at a time in turn (pad_to_max, trl_default, project, pad_to_max, ...), each timed
only while it holds the turn. Tokens/s counts real (non-pad) tokens. The final loss that compares the ways is the
answer-token loss on a fixed held-out set (no padding, batch 1) after training; the last logged train loss is
printed too. The last line of stdout is one JSON object (`ratio_vs_trl_default`, `ratio_vs_pad_to_max`,
`loss_rel_diff` = (project - trl_default) / trl_default of the held-out loss, ...).

Length grouping sorts windows of min(50, examples // 64) batches (transformers' LengthGroupedSampler), so this
short run (8 batches a window at --steps 32) groups less tightly than the train stage on a full split does:
the project's figures here are a lower bound. On this CPU, step time follows the padded tokens of the batch, so
the throughput ratios follow the padding ratios.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads: 1 thread is steadier (FINDINGS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DEV = PROJECT_ROOT.parent / "shared" / "medmcqa" / "dev.jsonl"
LENGTHS_FILE = Path(__file__).resolve().parent / "medmcqa_token_lengths.json"
MAX_LENGTH = 1024
WAYS = ("pad_to_max", "trl_default", "project")
TARGETS = {"ratio_vs_trl_default": 1.5, "ratio_vs_pad_to_max": 3.0, "loss_rel_diff": 0.02}
SMOKE = {"steps": 2, "eval_rows": 4, "batch_size": 4, "source": "stored"}
FULL = {"steps": 32, "eval_rows": 96, "batch_size": None, "source": "auto"}  # batch_size None: params.yaml's
SEED = 0  # which rows/lengths are drawn

log = logging.getLogger("benchmark")


def render(rows: list[dict[str, Any]], tokenizer: Any, params: Any) -> list[dict[str, Any]]:
    """Rows -> input_ids + completion_mask through the format stage's code, explanation included, untruncated."""
    from medlora.modeling.formatting import is_labeled, render_examples

    config = dataclasses.replace(params.format, include_explanation=True)
    return render_examples([r for r in rows if is_labeled(r)], tokenizer, config)


def fit(example: dict[str, Any]) -> dict[str, Any] | None:
    from medlora.modeling.formatting import fit_to_length

    return fit_to_length(example, MAX_LENGTH, "truncate")[0]


def lengths_table(lengths: list[int]) -> dict[str, Any]:
    """The stored length distribution: percentiles 0..100 of untruncated token lengths (derived figures only)."""
    import numpy as np

    values = np.asarray(lengths)
    return {
        "what": "token lengths of ../shared/medmcqa/dev.jsonl rows rendered by medlora.modeling.formatting "
        "(include_explanation=True, untruncated) with the tiny-nemotron-h tokenizer built from params.yaml",
        "rows": len(lengths),
        "mean": round(float(values.mean()), 1),
        "share_over_1024": round(float((values > MAX_LENGTH).mean()), 4),
        "percentiles": [round(float(np.percentile(values, q))) for q in range(101)],
    }


def shared_examples(tokenizer: Any, params: Any, count: int) -> tuple[list[dict[str, Any]], list[int]]:
    """`count` shuffled dev rows fitted to MAX_LENGTH, and every dev row's untruncated length."""
    from medlora.data.schema import read_jsonl_rows

    rendered = render(read_jsonl_rows(SHARED_DEV), tokenizer, params)
    lengths = [len(e["input_ids"]) for e in rendered]
    random.Random(SEED).shuffle(rendered)
    fitted = [f for f in map(fit, rendered) if f is not None]
    if len(fitted) < count:
        raise SystemExit(f"{SHARED_DEV} has {len(fitted)} usable rows; --steps/--eval-rows need {count}")
    return fitted[:count], lengths


def stored_examples(tokenizer: Any, params: Any, count: int) -> list[dict[str, Any]]:
    """`count` synthetic examples whose lengths are drawn from LENGTHS_FILE's percentiles, fitted to MAX_LENGTH.

    Each synthetic row's explanation is repeated past the drawn length, then cut to it; a length shorter than the
    row's prompt plus answer keeps the row without explanation (real rows that short have none either).
    """
    import numpy as np

    from medlora.core.io import read_json
    from medlora.data.synthetic import generate_splits

    percentiles = read_json(LENGTHS_FILE)["percentiles"]
    rng = np.random.default_rng(SEED)
    targets = np.interp(rng.uniform(0, 100, count), range(101), percentiles).round().astype(int)
    rows = generate_splits(SEED, count, 0, 0)["train"]
    long_rows = [{**r, "exp": ((r["exp"] or r["question"]) + "\n") * 60} for r in rows]
    short_rows = [{**r, "exp": None} for r in rows]
    examples = []
    pairs = zip(render(short_rows, tokenizer, params), render(long_rows, tokenizer, params), targets, strict=True)
    for short, long, target in pairs:
        cut = {**long, "input_ids": long["input_ids"][:target], "completion_mask": long["completion_mask"][:target]}
        chosen = short if len(short["input_ids"]) >= target else cut
        examples.append(fit(chosen))
    return examples


def write_dataset(examples: list[dict[str, Any]], path: Path) -> Any:
    """Write the examples as a format-stage file and load them back the way the train stage does."""
    from medlora.training.backends import load_formatted

    with path.open("w", encoding="utf-8") as out:
        for e in examples:
            out.write(json.dumps({"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]}) + "\n")
    return load_formatted(path)


class Lockstep:
    """Lets one trainer thread run at a time, one optimizer step each in turn, and times each one's turns."""

    def __init__(self, names: tuple[str, ...], total_steps: int) -> None:
        self.names, self.active, self.turn = names, list(names), names[0]
        self.cond = threading.Condition()
        self.arrived: set[str] = set()
        self.failed = False
        self.busy = dict.fromkeys(names, 0.0)
        self.step_seconds: dict[str, list[float]] = {n: [] for n in names}
        self.total_steps, self.started, self._since = total_steps, time.perf_counter(), 0.0
        self.log_every = max(1, min(8, total_steps // 4))  # at least 4 progress lines, at most one per 8 rounds

    def _wait_turn(self, name: str) -> None:
        self.cond.wait_for(lambda: self.failed or (self.turn == name and len(self.arrived) == len(self.names)))
        if self.failed:
            raise RuntimeError("another trainer failed")
        self._since = time.perf_counter()

    def _hand_over(self, name: str, leaving: bool) -> None:
        held = time.perf_counter() - self._since
        self.busy[name] += held
        self.step_seconds[name].append(held)
        following = self.active[(self.active.index(name) + 1) % len(self.active)]
        if leaving:
            self.active.remove(name)
        self.turn = following if following in self.active else None
        self.cond.notify_all()

    def start(self, name: str) -> None:
        with self.cond:
            self.arrived.add(name)
            self.cond.notify_all()
            self._wait_turn(name)

    def step_done(self, name: str, step: int) -> None:
        with self.cond:
            self._hand_over(name, leaving=False)
            if name == self.names[-1] and (step % self.log_every == 0 or step == self.total_steps):
                elapsed = time.perf_counter() - self.started
                log.info(
                    "round %d/%d: %.0f s, %.3f rounds/s, ETA %.0f s, busy s %s",
                    step,
                    self.total_steps,
                    elapsed,
                    step / elapsed,
                    elapsed * (self.total_steps - step) / step,
                    {n: round(s, 1) for n, s in self.busy.items()},
                )
            self._wait_turn(name)

    def finish(self, name: str) -> None:
        with self.cond:
            self._hand_over(name, leaving=True)

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


def lockstep_callback(lockstep: Lockstep, name: str) -> Any:
    from transformers import TrainerCallback

    class TakeTurns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            lockstep.start(name)

        def on_step_end(self, args, state, control, **kwargs):
            lockstep.step_done(name, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            lockstep.finish(name)

    return TakeTurns()


class CountingCollator:
    """Wraps the trainer's collator and counts the tokens of every batch it builds: all, and real (non-pad)."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.padded, self.real, self.batches = collator, 0, 0, 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.padded += batch["input_ids"].numel()
        self.real += int(batch["attention_mask"].sum())
        self.batches += 1
        return batch


def build_trainer(way: str, params: Any, base_dir: Path, dataset: Any, out_dir: Path, steps: int, lockstep: Lockstep):
    """One way's SFT trainer (the project's config and trainer class; only the batching differs between ways)."""
    from transformers import PrinterCallback

    from medlora.training.backends import load_peft_model, sft_config, sft_trainer_class

    strategy = params.train.train_sampling_strategy if way == "project" else "random"
    train = dataclasses.replace(params.train, max_steps=steps, num_train_epochs=1, train_sampling_strategy=strategy)
    model, tokenizer = load_peft_model("hf", base_dir, params.lora, train, has_gpu=False)  # same seed: same init
    config = dataclasses.replace(
        # model_config: the train stage's call (it decides padding-free batches; never on a CPU).
        sft_config(train, out_dir / way, has_gpu=False, model_config=model.config),
        eval_strategy="no",  # the held-out loss is computed after training, the same way for all three
        eval_on_start=False,
        save_strategy="no",
        disable_tqdm=True,
        pad_to_multiple_of=MAX_LENGTH if way == "pad_to_max" else None,
    )
    trainer = sft_trainer_class("hf", has_gpu=False)(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[lockstep_callback(lockstep, way)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout, whose last line must be the JSON
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


def heldout_loss(model: Any, examples: list[dict[str, Any]]) -> float:
    """Mean loss per answer token over `examples`, one at a time (no padding, so the same for every way)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            labels = ids.masked_fill(torch.tensor([e["completion_mask"]]) == 0, -100)
            tokens = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * tokens
            count += tokens
    return total / count


def train_all(trainers: dict[str, Any], lockstep: Lockstep) -> None:
    """Run every trainer's `train()` in its own thread, in lockstep; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(trainer: Any) -> None:
        try:
            trainer.train()
        except BaseException as error:
            errors.append(error)
            lockstep.fail()

    threads = [threading.Thread(target=run, args=(t,), name=w) for w, t in trainers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def summarize(way: str, trainer: Any, lockstep: Lockstep, eval_examples: list[dict[str, Any]]) -> dict[str, Any]:
    counter, seconds = trainer.data_collator, lockstep.busy[way]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "median_step_s": round(statistics.median(lockstep.step_seconds[way]), 3),
        "real_tokens": counter.real,
        "padded_tokens": counter.padded,
        "padding_waste": round(1 - counter.real / counter.padded, 4),
        "real_tokens_per_s": round(counter.real / seconds, 1),
        "last_train_loss": round(losses[-1], 4) if losses else None,
        "heldout_loss": round(heldout_loss(trainer.model, eval_examples), 4),
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (
        f"{'way':<12}{'steps':>6}{'seconds':>9}{'s/step':>8}{'real tok':>10}{'padded':>10}{'waste':>7}"
        f"{'real tok/s':>11}{'train loss':>11}{'heldout':>9}"
    )
    print(header)
    for way, r in results.items():
        print(
            f"{way:<12}{r['steps']:>6}{r['seconds']:>9.1f}{r['median_step_s']:>8.2f}{r['real_tokens']:>10}"
            f"{r['padded_tokens']:>10}{r['padding_waste']:>7.1%}{r['real_tokens_per_s']:>11.0f}"
            f"{r['last_train_loss']:>11.4f}{r['heldout_loss']:>9.4f}"
        )


def main() -> None:
    from medlora.core.config import load_params
    from medlora.core.stage import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per way, one epoch (default 32)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out examples for the final loss (96)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml train batch size")
    parser.add_argument("--source", choices=("auto", "shared", "stored"), default=None, help="default auto")
    parser.add_argument("--write-lengths", action="store_true", help=f"rewrite {LENGTHS_FILE.name} from dev.jsonl")
    parser.add_argument("--smoke", action="store_true", help=f"tiny run for tests: {SMOKE} unless given")
    parser.add_argument("--keep", default=None, help="build the inputs in this directory and keep it")
    args = parser.parse_args()
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    setup_logging("WARNING")
    log.setLevel(logging.INFO)
    started, load_before = time.perf_counter(), os.getloadavg()

    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer

    from medlora.core.io import write_json
    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import build_base_model
    from medlora.training.backends import batching

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    params = load_params(PROJECT_ROOT / "params.yaml")
    batch = args.batch_size or params.train.per_device_train_batch_size
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, per_device_train_batch_size=batch))
    count = args.steps * batch + args.eval_rows
    source = ("shared" if SHARED_DEV.exists() else "stored") if args.source == "auto" else args.source
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="medlora-bench-") as tmp
    ):
        work = Path(tmp)
        train_rows = generate_splits(params.snapshot.seed, params.snapshot.train_size, 0, 0)["train"]
        build_base_model(params.model, train_rows, work / "base_model")
        tokenizer = AutoTokenizer.from_pretrained(str(work / "base_model"))
        if source == "shared" or args.write_lengths:
            examples, lengths = shared_examples(tokenizer, params, count)
            if args.write_lengths:
                write_json(LENGTHS_FILE, lengths_table(lengths))
                log.info("wrote %s from %d dev rows", LENGTHS_FILE, len(lengths))
        if source == "stored":
            examples = stored_examples(tokenizer, params, count)
        train_examples, eval_examples = examples[: count - args.eval_rows], examples[count - args.eval_rows :]
        dataset = write_dataset(train_examples, work / "train.jsonl")
        lengths = [len(e["input_ids"]) for e in train_examples]
        log.info(
            "%d training examples (%s lengths: mean %.0f, median %.0f, max %d), %d held out; batch %d, %d steps",
            len(train_examples),
            source,
            statistics.mean(lengths),
            statistics.median(lengths),
            max(lengths),
            len(eval_examples),
            batch,
            args.steps,
        )
        lockstep = Lockstep(WAYS, args.steps)
        trainers = {w: build_trainer(w, params, work / "base_model", dataset, work, args.steps, lockstep) for w in WAYS}
        initial = heldout_loss(trainers["project"].model, eval_examples)  # the trainer puts it back in train mode
        train_all(trainers, lockstep)
        results = {w: summarize(w, t, lockstep, eval_examples) for w, t in trainers.items()}
    project_batching = batching(params.train, trainers["project"].model.config, has_gpu=False)
    log.info("project batching (as the train stage logs it): %s", project_batching)

    project, trl_default, pad_to_max = (results[w] for w in ("project", "trl_default", "pad_to_max"))
    trl_loss = trl_default["heldout_loss"]
    figures = {
        "ratio_vs_trl_default": round(project["real_tokens_per_s"] / trl_default["real_tokens_per_s"], 3),
        "ratio_vs_pad_to_max": round(project["real_tokens_per_s"] / pad_to_max["real_tokens_per_s"], 3),
        "loss_rel_diff": round((project["heldout_loss"] - trl_loss) / trl_loss, 4),
    }
    met = {
        "ratio_vs_trl_default": figures["ratio_vs_trl_default"] >= TARGETS["ratio_vs_trl_default"],
        "ratio_vs_pad_to_max": figures["ratio_vs_pad_to_max"] >= TARGETS["ratio_vs_pad_to_max"],
        "loss_rel_diff": abs(figures["loss_rel_diff"]) <= TARGETS["loss_rel_diff"],
    }
    print(f"source {source}, max_length {MAX_LENGTH}, batch {batch}, held-out loss before training {initial:.4f}")
    print_table(results)
    print(
        f"project vs trl_default: {figures['ratio_vs_trl_default']:.2f}x real tokens/s (target >= 1.5x); "
        f"vs pad_to_max: {figures['ratio_vs_pad_to_max']:.2f}x (target >= 3x); held-out loss "
        f"{figures['loss_rel_diff']:+.2%} vs trl_default (target within 2%)"
    )
    print(
        json.dumps(
            {
                **figures,
                "targets": TARGETS,
                "targets_met": met,
                "source": source,
                "max_length": MAX_LENGTH,
                "batch_size": batch,
                "project_batching": project_batching,
                "steps": args.steps,
                "train_examples": len(train_examples),
                "heldout_examples": len(eval_examples),
                "heldout_loss_initial": round(initial, 4),
                "ways": results,
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "seconds_total": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
