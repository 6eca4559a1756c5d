"""Benchmark: the torch Mamba-2 scan's `chunk_size` for the tiny preset, timed on a training step on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mamba_chunk_size.py [--chunk-sizes 8,16,32,64] [--repeats 5]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mamba_chunk_size.py --smoke      # ~15 s

Without `mamba_ssm` (CPU) transformers runs NemotronH's Mamba layers through its reference torch scan, whose cost
depends on `chunk_size` (the sequence is padded to a multiple of it, and each chunk builds chunk x chunk
matrices) while its result does not. This builds the tiny preset's model (`presets.tiny_nemotron_h_config`, the
tokenizer trained on synthetic rows as the `model` stage does), formats synthetic rows with the format stage's own
code and params.yaml's `format` section (max_length 256; the token lengths are reported), and cuts them into
length-grouped batches of params.yaml's batch size (16), padded to their longest example, as the train stage does.
A batch of max_length-long examples is timed too.

One training step = forward + backward with the loss on the answer tokens (all parameters trainable; the scan's
backward is what LoRA pays too). Every chunk size runs on the same model (only each Mamba mixer's `chunk_size`
changes), the same batches, in one process, interleaved: each repeat visits the chunk sizes in a rotated order,
so drift on 2 shared cores (FINDINGS) falls on all of them alike. Losses and gradient norms must agree across
chunk sizes (relative difference below `--tolerance`), else the run fails: a faster setting that changed the
result would not be a setting. `fastest` is the chunk size with the least time over all timed batches (each
grouped batch and the max_length one once). stdout: a table, then one JSON line (`fastest`, `configured`, per chunk
size `median_s`/`min_s` of a grouped batch's step, `max_length_median_s`, `all_batches_s`,
`speedup_vs_configured`, `loss_max_rel_diff`, ...).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: 1 thread is steadier (FINDINGS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FULL = {"chunk_sizes": "8,16,32,64", "repeats": 5, "batches": 6, "rows": 2000, "batch_size": None}
SMOKE = {"chunk_sizes": "8,16,64", "repeats": 2, "batches": 1, "rows": 120, "batch_size": 2}
SEED = 0

log = logging.getLogger("benchmark")


def formatted_examples(params: Any, rows: int) -> tuple[Any, list[dict[str, Any]]]:
    """(tokenizer, examples): synthetic rows through the format stage's code with params.yaml's `format`."""
    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import tokenizer_corpus
    from medlora.modeling.formatting import format_rows
    from medlora.modeling.presets import TINY_VOCAB
    from medlora.modeling.tokenizer import train_chat_tokenizer

    train = generate_splits(params.snapshot.seed, rows, 0, 0)["train"]
    tokenizer = train_chat_tokenizer(tokenizer_corpus(train), vocab_size=TINY_VOCAB)
    kept, _ = format_rows(train, tokenizer, params.format)
    return tokenizer, [json.loads(line) for _, line in kept]


def length_grouped_batches(examples: list[dict[str, Any]], batch_size: int, count: int) -> list[list[dict]]:
    """`count` batches as length grouping makes them: shuffled, sorted by length in windows, cut into batches;
    the batches taken are spread over the length range (shortest to longest)."""
    shuffled = list(examples)
    random.Random(SEED).shuffle(shuffled)
    window = batch_size * 50  # transformers' LengthGroupedSampler sorts megabatches of 50 batches
    batches = []
    for start in range(0, len(shuffled), window):
        group = sorted(shuffled[start : start + window], key=lambda e: len(e["input_ids"]), reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group) - batch_size + 1, batch_size)]
    batches.sort(key=lambda b: len(b[0]["input_ids"]))
    if not batches:
        raise SystemExit(f"{len(examples)} examples make no batch of {batch_size}")
    picks = sorted({round(i * (len(batches) - 1) / max(1, count - 1)) for i in range(count)})
    return [batches[i] for i in picks]


def max_length_batch(examples: list[dict[str, Any]], batch_size: int, max_length: int) -> list[dict]:
    """A batch of `max_length`-long examples (the longest the format stage keeps): examples repeated end to end."""
    batch = []
    for example in examples[:batch_size]:
        ids, mask = list(example["input_ids"]), list(example["completion_mask"])
        while len(ids) < max_length:
            ids, mask = ids + example["input_ids"], mask + example["completion_mask"]
        batch.append({"input_ids": ids[:max_length], "completion_mask": mask[:max_length]})
    return batch


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; labels only on answer tokens (the format stage's completion_mask), -100 elsewhere."""
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        attention[row, :n] = 1
        mask = torch.tensor(example["completion_mask"], dtype=torch.bool)
        labels[row, :n] = torch.where(mask, ids[row, :n], torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def mamba_mixers(model: Any) -> list[Any]:
    mixers = [m for m in model.modules() if hasattr(m, "chunk_size") and hasattr(m, "A_log")]
    if not mixers:
        raise SystemExit("no Mamba mixer with a chunk_size found in the model")
    return mixers


def train_step(model: Any, batch: dict[str, Any]) -> tuple[float, float, float]:
    """(seconds, loss, gradient norm) of one forward + backward."""
    import torch

    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return seconds, loss.item(), norm.item()


def relative(values: list[float]) -> float:
    return (max(values) - min(values)) / max(abs(statistics.fmean(values)), 1e-12)


def main() -> None:
    from medlora.core.config import load_params
    from medlora.modeling.base_model import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run for tests (2 repeats, batch 2, 1 batch)")
    parser.add_argument("--chunk-sizes", default=None, help=f"comma-separated (default {FULL['chunk_sizes']})")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed visits per chunk size and batch ({FULL['repeats']})"
    )
    parser.add_argument("--batches", type=int, default=None, help=f"length-grouped batches timed ({FULL['batches']})")
    parser.add_argument("--rows", type=int, default=None, help=f"synthetic rows formatted ({FULL['rows']})")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml train batch size")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss/grad-norm difference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    defaults = SMOKE if args.smoke else FULL
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    params = load_params(PROJECT_ROOT / "params.yaml")
    batch_size = settings["batch_size"] or params.train.per_device_train_batch_size
    chunk_sizes = [int(c) for c in str(settings["chunk_sizes"]).split(",")]
    started = time.perf_counter()
    tokenizer, examples = formatted_examples(params, settings["rows"])
    lengths = sorted(len(e["input_ids"]) for e in examples)
    model = build_tiny_model(tokenizer, params.model.seed)
    model.train()
    mixers = mamba_mixers(model)
    configured = mixers[0].chunk_size
    grouped = length_grouped_batches(examples, batch_size, settings["batches"])
    cases = {f"grouped-{i}": collate(b, tokenizer.pad_token_id) for i, b in enumerate(grouped)}
    long_length = params.format.max_length if not args.smoke else 64
    cases["max_length"] = collate(max_length_batch(examples, batch_size, long_length), tokenizer.pad_token_id)
    widths = {name: int(batch["input_ids"].shape[1]) for name, batch in cases.items()}
    log.info(
        "%d examples (token length p50 %d, max %d), %d Mamba layers, batch %d, padded widths %s; set-up %.1f s",
        len(examples),
        lengths[len(lengths) // 2],
        lengths[-1],
        len(mixers),
        batch_size,
        widths,
        time.perf_counter() - started,
    )

    def set_chunk(size: int) -> None:
        for mixer in mixers:
            mixer.chunk_size = size

    seconds = {c: {name: [] for name in cases} for c in chunk_sizes}
    results = {c: {} for c in chunk_sizes}  # chunk -> case -> (loss, grad norm)
    for chunk in chunk_sizes:  # warm-up, and the loss/gradient of every case at every chunk size
        set_chunk(chunk)
        for name, batch in cases.items():
            _, loss, norm = train_step(model, batch)
            results[chunk][name] = (loss, norm)
    for repeat in range(settings["repeats"]):
        rotation = repeat % len(chunk_sizes)
        for chunk in chunk_sizes[rotation:] + chunk_sizes[:rotation]:
            set_chunk(chunk)
            for name, batch in cases.items():
                seconds[chunk][name].append(train_step(model, batch)[0])
        log.info("repeat %d/%d done (%.0f s)", repeat + 1, settings["repeats"], time.perf_counter() - started)
    set_chunk(configured)

    loss_diff = max(relative([results[c][name][0] for c in chunk_sizes]) for name in cases)
    norm_diff = max(relative([results[c][name][1] for c in chunk_sizes]) for name in cases)
    grouped_names = [name for name in cases if name.startswith("grouped")]
    figures = {}
    for chunk in chunk_sizes:
        # One "typical step": the grouped batches in turn. Median and minimum of each batch's times, summed.
        per_batch_median = [statistics.median(seconds[chunk][name]) for name in grouped_names]
        per_batch_min = [min(seconds[chunk][name]) for name in grouped_names]
        long_median = statistics.median(seconds[chunk]["max_length"])
        figures[chunk] = {
            "median_s": round(statistics.fmean(per_batch_median), 4),
            "min_s": round(statistics.fmean(per_batch_min), 4),
            "max_length_median_s": round(long_median, 4),
            # The pick: every timed batch counts once, the max_length one included (longer rows do occur).
            "all_batches_s": round(sum(per_batch_median) + long_median, 4),
        }
    fastest = min(chunk_sizes, key=lambda c: figures[c]["all_batches_s"])
    reference = figures.get(configured, figures[max(chunk_sizes)])
    for chunk in chunk_sizes:
        figures[chunk]["speedup_vs_configured"] = round(reference["median_s"] / figures[chunk]["median_s"], 3)
        figures[chunk]["max_length_speedup"] = round(
            reference["max_length_median_s"] / figures[chunk]["max_length_median_s"], 3
        )
    agree = loss_diff <= args.tolerance and norm_diff <= args.tolerance * 10
    summary = {
        "chunk_sizes": chunk_sizes,
        "configured": configured,
        "fastest": fastest,
        "by_chunk_size": {str(c): figures[c] for c in chunk_sizes},
        "batch_size": batch_size,
        "padded_widths": widths,
        "token_lengths": {"p50": lengths[len(lengths) // 2], "max": lengths[-1], "examples": len(lengths)},
        "mamba_layers": len(mixers),
        "repeats": settings["repeats"],
        "threads": torch.get_num_threads(),
        "loss_max_rel_diff": loss_diff,
        "grad_norm_max_rel_diff": norm_diff,
        "results_agree": agree,
        "seconds": round(time.perf_counter() - started, 1),
    }
    long_header = f"{long_length}-token step s"
    print(
        f"{'chunk':>6}{'step s (median)':>17}{'step s (min)':>14}{'vs configured':>15}{long_header:>18}"
        f"{'all batches s':>15}"
    )
    for chunk in chunk_sizes:
        f = figures[chunk]
        mark = " <- fastest" if chunk == fastest else (" (configured)" if chunk == configured else "")
        print(
            f"{chunk:>6}{f['median_s']:>17.3f}{f['min_s']:>14.3f}{f['speedup_vs_configured']:>14.2f}x"
            f"{f['max_length_median_s']:>18.3f}{f['all_batches_s']:>15.3f}{mark}"
        )
    print(
        f"batch {batch_size}, padded widths {sorted(set(widths.values()))}, {len(mixers)} Mamba layers, "
        f"{settings['repeats']} interleaved repeats; loss max rel diff {loss_diff:.1e}, grad norm {norm_diff:.1e}"
    )
    print(json.dumps(summary), flush=True)
    if not agree:
        raise SystemExit(f"results differ across chunk sizes: loss {loss_diff:.2e}, grad norm {norm_diff:.2e}")


if __name__ == "__main__":
    main()
