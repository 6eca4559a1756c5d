"""Stage `validate`: great-expectations suite + contamination guard over data/medmcqa, quarantine bad rows.

    python pipelines/validate.py        # or: dvc repro validate

Reads `params.yaml` (`validate`, `paths`). Writes outputs/validated/{split}.jsonl (kept rows),
outputs/quarantine/{split}.jsonl (flagged rows with their reasons) and reports/validation.json.
Exits non-zero, naming file, line and problem, when a snapshot file cannot be parsed; and, under
`validate.on_error: fail`, when any rule flags a row.
"""

from __future__ import annotations

from medlora.core.stage import run_stage
from medlora.data import validation


def main() -> None:
    run_stage(validation.run)


if __name__ == "__main__":
    main()
