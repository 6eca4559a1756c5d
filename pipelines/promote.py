"""Stage `promote`: run the promotion gates on the versions just registered and move `champion` if they pass.

    python pipelines/promote.py         # or: dvc repro promote

Reads reports/registration.json, reports/eval.json (`gate`), reports/validation.json, reports/train.json and the
current champion's tags; writes reports/promotion.json (`decision`, `reasons`, champion before and after).
A rejected candidate is not an error: it stays `challenger` and the stage succeeds.
"""

from __future__ import annotations

from pathlib import Path

from medlora.core.config import load_params
from medlora.core.io import write_json
from medlora.core.logs import setup_logging
from medlora.registry.promote import promote_stage


def main() -> None:
    setup_logging()
    params = load_params()
    promotion = promote_stage(params)
    write_json(Path(params.paths.reports_dir) / "promotion.json", promotion)


if __name__ == "__main__":
    main()
