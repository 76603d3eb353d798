"""Logging set-up shared by every runner (CLI, torchrun children, Airflow tasks).

No log line (ours or a library's: message, arguments or traceback) shows a credential: task logs in
Airflow are readable by every UI user. Records are redacted where they are made (a log record factory),
so every handler sees the redacted message, also those a library adds for itself. A library handler that
prints the exception's own text (DVC's, put on the `dvc*` loggers by `import dvc`) is dropped where the
library is imported (:func:`adopt_library_loggers`). The root logger's handlers also carry a
:class:`RedactingFilter`, for records made before the factory was installed or by a factory set later.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tasks.core.redact import redact


def redact_record(record: logging.LogRecord) -> None:
    """Rewrite `record` in place: message and arguments merged and redacted, traceback text redacted."""
    try:
        record.msg, record.args = redact(record.getMessage()), None
    except Exception:  # a malformed call: leave it to the handler's own "Logging error" report
        return
    if record.exc_info and not record.exc_text:
        # the Formatter reuses exc_text when it is set: format once here, redacted
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """Rewrites a record in place: message and arguments merged and redacted, traceback text redacted.

    A handler filter (not a logger filter) because records logged to child loggers (`dvc_data...`,
    `qa_lora.version`) skip the filters of the loggers they propagate to, but not those of the handlers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record; never drops it."""
        redact_record(record)
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Redact every record where it is made, and add one RedactingFilter to every handler of `logger`
    (default: the root logger); idempotent.

    `setup_logging` calls it; a host that owns the handlers (an Airflow task) calls it directly.
    """
    make_record = logging.getLogRecordFactory()
    if not getattr(make_record, "redacts", False):

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            if isinstance(record.msg, str):  # structlog's event dicts are left to the handler filter
                redact_record(record)
            return record

        redacting_factory.redacts = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(redacting_factory)
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def adopt_library_loggers(*names: str) -> None:
    """Drop the handlers a library put on its own loggers (at import), so their records reach only the
    root logger's: one format, and redacted (DVC's console handler prints an exception's text as is).
    """
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        _quiet(logger)  # `import dvc` also sets its loggers to INFO


def _quiet(logger: logging.Logger) -> None:
    """Warnings and errors only (or less, when the root logger is set higher)."""
    logger.setLevel(max(logging.WARNING, logging.getLogger().level))


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
        _quiet(logging.getLogger(noisy))
