"""Stage `model`: materialise the base model preset (`params.model`) into `paths.base_model_dir`.

    python pipelines/model.py        # or: dvc repro model

tiny-nemotron-h: trains the tokenizer on the validated train split and builds a NemotronH with random weights
from `model.seed`, saved as a Hugging Face directory. Hub presets: writes the tokenizer and the reference
(hub id + pinned revision) only; the weights are loaded by `from_pretrained` where training runs.
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.modeling import base_model


def main() -> None:
    run_stage(base_model.run)


if __name__ == "__main__":
    main()
