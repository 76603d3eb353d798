"""Logging set-up shared by every runner (CLI, torchrun children, Airflow tasks).

Every record that reaches a handler of the root logger passes a :class:`RedactingFilter` first, so no
log line (ours or a library's, message, arguments or traceback) shows a credential: task logs in
Airflow are readable by every UI user.
"""

from __future__ import annotations

import logging
import sys

from tasks.core.redact import redact


class RedactingFilter(logging.Filter):
    """Rewrites a record in place: message and arguments merged and redacted, traceback text redacted.

    A handler filter (not a logger filter) because records logged to child loggers (`dvc_data...`,
    `qa_lora.version`) skip the filters of the loggers they propagate to, but not those of the handlers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to the handler's own "Logging error" report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            # the Formatter reuses exc_text when it is set: format once here, redacted
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Add one RedactingFilter to every handler of `logger` (default: the root logger); idempotent.

    `setup_logging` calls it; a host that owns the handlers (an Airflow task) calls it directly.
    """
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def setup_logging(level: str = "INFO") -> None:
    """Timestamped, redacted progress lines on stderr (what an Airflow task log shows)."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    install_redaction()
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
