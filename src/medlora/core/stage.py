"""How every stage script runs: one logging set-up, params parsed once, the report written the same way.

    # pipelines/<stage>.py
    from medlora.core.stage import run_stage
    from medlora.training import train

    def main() -> None:
        run_stage(train.run)

The library verb `run(params) -> Report` writes the stage's outputs; `run_stage` writes the report it returns to
`reports/<Report.FILE>` and logs its one-line summary. A verb that stops on purpose raises `StageFailed`, whose report
(when it has one) is written all the same, so a person can read why; the script then exits 1 without a traceback.
A params file that does not parse exits 2 with the message only: a typo is not a crash.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from medlora.core.config import ConfigError, Params, load_params
from medlora.core.contracts import ContractError, Report, StageFailed
from medlora.core.hub import HubUnavailable
from medlora.core.io import JsonlError
from medlora.core.metrics import write_metrics

logger = logging.getLogger("medlora.stage")


def setup_logging(level: str | None = None) -> None:
    """`time level module: message` on stderr, for stage scripts and the CLI."""
    logging.basicConfig(
        level=(level or os.environ.get("MEDLORA_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Telemetry and hub calls are never wanted from a stage; users can still override these.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    for noisy in ("urllib3", "filelock", "httpx", "alembic", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(verb: Callable[[Params], Report], params_file: str = "params.yaml") -> Report:
    """Run one stage's verb with the project's params; write and log its report. Exits 1 on StageFailed, 2 on a
    params file that does not parse."""
    setup_logging()
    try:
        params = load_params(params_file)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        report = verb(params)
    except (ContractError, JsonlError, HubUnavailable) as error:  # missing or unreadable inputs: the message says it
        logger.error("%s", error)
        sys.exit(1)
    except StageFailed as failure:
        if failure.report is not None:
            path = failure.report.write(params.paths.reports_dir)
            logger.error("%s (report: %s)", failure, path)
        else:
            logger.error("%s", failure)
        sys.exit(1)
    path = report.write(params.paths.reports_dir)
    write_metrics(report, params.paths.reports_dir)  # the compact figures `dvc exp show` tabulates per experiment
    logger.info("%s -> %s", report.summary(), path)
    return report
