"""Structured logging: JSON lines in production, readable text in development.

Every line about a request carries its request id, tenant id and trace/span ids: as
fields in JSON, as a ``[req=… tenant=… trace=…]`` tag in text. `request_logger` gives a
logger that adds them; anything passed as ``extra=`` (status, tokens, ttft_s, …) becomes
further JSON fields or ``key=value`` pairs in text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_local.core.types import RequestContext
    from llm_local.settings.schema import LoggingSettings

REQUEST_FIELDS = ("request_id", "tenant_id", "call_id", "trace_id", "span_id")
_TEXT_TAGS = (("request_id", "req"), ("tenant_id", "tenant"), ("call_id", "call"),
              ("trace_id", "trace"), ("span_id", "span"))  # fmt: skip

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

# Libraries that talk too much at INFO: their per-connection chatter drowns the service's
# own lines. They still log warnings and errors.
NOISY_LOGGERS = (
    "hypercorn.access",
    "hypercorn.error",
    "uvicorn",
    "uvicorn.access",
    "uvicorn.error",
    "grpclib",
    "grpclib.protocol",
    "grpclib.server",
    "h2",
    "hpack",
    "asyncio",
    "trio_asyncio",
    "quart.serving",
)

_HANDLER_NAME = "llm_local"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request fields, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            if value is not None or key not in REQUEST_FIELDS:
                entry[key] = _json_safe(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)

    @staticmethod
    def _timestamp(created: float) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``12:00:00.123 INFO  llm_local.x [req=… tenant=… trace=…] message key=value``."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        extras = _extra_fields(record)
        tags = [
            f"{tag}={extras.pop(field)}"
            for field, tag in _TEXT_TAGS
            if extras.get(field) is not None
        ]
        for field in REQUEST_FIELDS:
            extras.pop(field, None)
        clock = f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d}"
        parts = [clock, f"{record.levelname:<5}", record.name]
        if tags:
            parts.append(f"[{' '.join(tags)}]")
        parts.append(record.getMessage())
        parts.extend(f"{key}={value}" for key, value in extras.items() if value is not None)
        line = " ".join(parts)
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def configure_logging(settings: LoggingSettings) -> None:
    """Send every log line to stderr in the configured format and level.

    Idempotent: calling it again (tests, reloads) replaces our handler, not adds one.
    """
    level = logging.getLevelName(settings.level.upper())
    if not isinstance(level, int):
        raise ValueError(f"logging.level: unknown level {settings.level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

    quiet_level = max(level, logging.WARNING)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(quiet_level)
        # Libraries that install their own stderr handler would bypass our format.
        logger.handlers.clear()
        logger.propagate = True


class RequestLoggerAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds the request's ids to every line, keeping any ``extra=`` the caller passes."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        # The stock adapter replaces the caller's extra with its own; merge instead.
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def request_logger(
    context: RequestContext, logger: logging.Logger | None = None
) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose lines carry `context`'s request, tenant, call, trace and span ids."""
    return RequestLoggerAdapter(
        logger if logger is not None else logging.getLogger("llm_local.request"),
        {
            "request_id": context.request_id,
            "tenant_id": context.tenant_id,
            "call_id": context.call_id,
            "trace_id": context.trace_id,
            "span_id": context.span_id,
        },
    )
