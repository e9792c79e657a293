"""Logging: Rich on a terminal, one JSON object per line otherwise (journald, pipes)."""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Any

from milton.core.timeutil import iso, utcnow

LOGGER_NAME = "milton"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": iso(utcnow()),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}) or {})
        if record.exc_info and record.exc_info[0] is not None:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class _FieldsFormatter(logging.Formatter):
    """For the terminal: structured fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup_logging(
    level: str | int = "INFO", *, json_logs: bool | None = None, stream: IO[str] | None = None
) -> None:
    """Configure the ``milton`` logger once per process (idempotent)."""
    stream = stream or sys.stdout
    if json_logs is None:
        json_logs = not (hasattr(stream, "isatty") and stream.isatty())
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler: logging.Handler
    if json_logs:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(
            console=Console(file=stream), show_path=False, rich_tracebacks=False, markup=False
        )
        handler.setFormatter(_FieldsFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a message with structured fields (JSON keys, or key=value on a terminal)."""
    logger.log(level, msg, extra={"fields": fields})
