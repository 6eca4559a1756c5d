"""Stage `validate`: great-expectations suite + contamination guard over data/medmcqa, quarantine bad rows.

    python pipelines/validate.py        # or: dvc repro validate

Reads `params.yaml` (`validate`, `paths`). Writes outputs/validated/{split}.jsonl (kept rows),
outputs/quarantine/{split}.jsonl (flagged rows with their reasons) and reports/validation.json.
Exits non-zero, naming file, line and problem, when a snapshot file cannot be parsed; and, under
`validate.on_error: fail`, when any rule flags a row.
"""

from __future__ import annotations

import logging
import sys

from medlora.core.config import load_params
from medlora.core.logs import setup_logging
from medlora.data.schema import SnapshotParseError
from medlora.data.validation import ValidationFailed, validate

log = logging.getLogger("validate")


def main() -> None:
    setup_logging()
    params = load_params()
    try:
        report = validate(params)
    except SnapshotParseError as error:
        log.error("cannot parse the snapshot: %s", error)
        sys.exit(1)
    except ValidationFailed as error:
        log.error("%s", error)
        sys.exit(1)
    for split, counts in report["splits"].items():
        log.info("%-10s in %6d  kept %6d  quarantined %5d", split, *counts.values())


if __name__ == "__main__":
    main()
