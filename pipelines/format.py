"""Stage `format`: validated train rows -> chat-template token ids with the loss on the assistant turn.

    python pipelines/format.py        # or: dvc repro format

Reads `params.format`, the validated train split and the base model's tokenizer; writes
`paths.formatted_dir/{train,early_stop}.jsonl` (the early-stopping slice is carved from train, never from
validation) and `reports/format.json` (rows in/kept/dropped/truncated/unlabeled, token-length statistics).
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.modeling import formatting


def main() -> None:
    run_stage(formatting.run)


if __name__ == "__main__":
    main()
