"""Stage `promote`: run the promotion gates on the versions just registered and move `champion` if they pass.

    python pipelines/promote.py         # or: dvc repro promote

Reads reports/registration.json, reports/eval.json (`gate`), reports/validation.json, reports/train.json and the
current champion's tags; writes reports/promotion.json (`decision`, `reasons`, champion before and after).
A rejected candidate is not an error: it stays `challenger` and the stage succeeds.
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.registry import promote


def main() -> None:
    run_stage(promote.run)


if __name__ == "__main__":
    main()
