"""One logging set-up for stage scripts and the CLI: `time level module: message` on stderr."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
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
