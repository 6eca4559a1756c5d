"""Peak host memory of the merge stage against the bytes of the weights, on replicas of the hub checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/merge_memory.py            # replica sizes tiny, small, medium
    OMP_NUM_THREADS=1 python benchmarks/merge_memory.py --smoke    # tiny only

Each size runs in its own process (a fresh peak RSS): build the replica, write the `model` stage's base directory for
the production preset pointed at it, save a random LoRA adapter, run `merge_adapter` in bf16. The merge holds one
model at a time (the adapter model is freed before the merged copy is reloaded), so the peak should stay near
(process baseline + 1x the weights), not 2x. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child"


def measure(size: str, work: Path) -> dict:
    """In this process: baseline RSS after imports, then the merge's peak RSS; both in MiB."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medlora.core.config import FormatConfig, MergeConfig, ModelConfig
    from medlora.core.io import write_jsonl
    from medlora.data.synthetic import generate_splits
    from medlora.modeling.base_model import build_base_model, load_base_model
    from medlora.modeling.formatting import render_example
    from medlora.modeling.presets import NEMOTRON_H_TARGETS
    from medlora.modeling.replica import build_replica
    from medlora.training.merge import merge_adapter

    rows = generate_splits(0, 64, 0, 0)["train"]
    replica = build_replica(work / "replica", size)
    config = ModelConfig(preset="nemotron-3-nano-30b-a3b", name_or_path=str(replica), torch_dtype="bfloat16")
    build_base_model(config, rows, work / "base")
    model, tokenizer = load_base_model(work / "base")
    lora = LoraConfig(r=16, target_modules=list(NEMOTRON_H_TARGETS), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(work / "adapter")
    write_jsonl(work / "early_stop.jsonl", [render_example(row, tokenizer, FormatConfig()) for row in rows[:8]])
    weights = sum(path.stat().st_size for path in replica.glob("*.safetensors"))
    del model
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far: imports + one bf16 load
    torch.manual_seed(0)
    start = time.monotonic()
    report = merge_adapter(work / "base", work / "adapter", work / "merged", work / "early_stop.jsonl", MergeConfig())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "size": size,
        "weights_mib": round(weights / 2**20, 2),
        "baseline_peak_mib": round(baseline, 1),
        "merge_peak_mib": round(peak, 1),
        "merge_extra_mib": round(peak - baseline, 1),
        "extra_per_weight_byte": round((peak - baseline) / (weights / 2**20), 2),
        "seconds": round(time.monotonic() - start, 2),
        "parity": report.mean_abs_answer_logprob_diff,
        "success": report.success,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"])
    parser.add_argument("--smoke", action="store_true", help="tiny only")
    parser.add_argument(CHILD, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(measure(args.child, Path(work))))
        return
    sizes = ["tiny"] if args.smoke else args.sizes
    results = []
    for number, size in enumerate(sizes, start=1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        out = subprocess.run([sys.executable, __file__, CHILD, size], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"size {size} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"[{number}/{len(sizes)}] {size} done in {results[-1]['seconds']} s", file=sys.stderr)
    print(f"{'size':<6} {'weights MiB':>12} {'baseline MiB':>13} {'merge peak MiB':>15} {'extra/weights':>14}")
    for r in results:
        print(
            f"{r['size']:<6} {r['weights_mib']:>12} {r['baseline_peak_mib']:>13} {r['merge_peak_mib']:>15} "
            f"{r['extra_per_weight_byte']:>14}"
        )
    summary: dict = {"merge_memory": results}
    if len(results) > 1:
        # The fixed part (imports, parity batch, allocator) cancels between sizes; what is left is what the weights add.
        first, last = results[0], results[-1]
        slope = (last["merge_extra_mib"] - first["merge_extra_mib"]) / (last["weights_mib"] - first["weights_mib"])
        summary["marginal_extra_per_weight_byte"] = round(slope, 3)
        sizes = f"{first['size']} -> {last['size']}"
        print(f"merge memory beyond one loaded model, per extra weight byte ({sizes}): {slope:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
