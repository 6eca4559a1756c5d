"""Stage `params`: parse and check params.yaml before any other stage runs.

    python pipelines/params.py        # or: dvc repro params

Every other stage is downstream of this one (validate depends on its report), so a misspelled key or a wrong type
stops `dvc repro` here, with the file, the key and the known keys and no traceback, before DVC deletes the outputs
of the stage the key belongs to. Writes reports/params.json, whose bytes do not change with the values.
"""

from __future__ import annotations

from medlora.core import config
from medlora.core.stage import run_stage


def main() -> None:
    run_stage(config.run)


if __name__ == "__main__":
    main()
