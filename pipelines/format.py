"""Stage `format`: validated train rows -> chat-template token ids with the loss on the assistant turn.

    python pipelines/format.py        # or: dvc repro format

Reads `params.format`, the validated train split and the base model's tokenizer; writes
`paths.formatted_dir/{train,early_stop}.jsonl` (the early-stopping slice is carved from train, never from
validation) and `reports/format.json` (rows in/kept/dropped/truncated/unlabeled, token-length statistics).
"""

from __future__ import annotations

from pathlib import Path

from medlora.core.config import load_params
from medlora.modeling.formatting import format_training_data
from medlora.core.io import write_json
from medlora.core.logs import setup_logging


def main() -> None:
    setup_logging()
    params = load_params()
    report = format_training_data(
        validated_train=Path(params.paths.validated_dir) / "train.jsonl",
        base_dir=params.paths.base_model_dir,
        out_dir=params.paths.formatted_dir,
        config=params.format,
    )
    write_json(Path(params.paths.reports_dir) / "format.json", report)


if __name__ == "__main__":
    main()
