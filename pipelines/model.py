"""Stage `model`: materialise the base model preset (`params.model`) into `paths.base_model_dir`.

    python pipelines/model.py        # or: dvc repro model

tiny-nemotron-h: trains the tokenizer on the validated train split and builds a NemotronH with random weights
from `model.seed`, saved as a Hugging Face directory. Hub presets: writes the tokenizer and the reference
(hub id + pinned revision) only; the weights are loaded by `from_pretrained` where training runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from medlora.core.config import load_params
from medlora.core.logs import setup_logging
from medlora.modeling.base_model import build_base_model
from medlora.data.schema import read_jsonl_rows

logger = logging.getLogger("pipelines.model")


def main() -> None:
    setup_logging()
    params = load_params()
    start = time.monotonic()
    train_rows = read_jsonl_rows(Path(params.paths.validated_dir) / "train.jsonl")
    reference = build_base_model(params.model, train_rows, params.paths.base_model_dir)
    logger.info("model: %s in %.1f s -> %s", reference, time.monotonic() - start, params.paths.base_model_dir)


if __name__ == "__main__":
    main()
