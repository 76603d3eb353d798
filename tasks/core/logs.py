"""Logging set-up shared by every runner (CLI, torchrun children, Airflow tasks)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    """Timestamped progress lines on stderr (what an Airflow task log shows)."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Libraries whose INFO lines drown the pipeline's own progress in task logs.
    for noisy in (
        "great_expectations",
        "alembic",
        "httpx",
        "urllib3",
        "filelock",
        "mlflow",
        "dvc",
        "asyncio",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
