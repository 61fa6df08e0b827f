"""Process logging: plain text or one JSON object per line (`--log-json`), each record carrying
the request id and the trace/span ids of the request it belongs to.

A servicer calls bind_request(request_id, span) at the start of an RPC. grpc.aio runs every
RPC in its own task with a copy of the context, so the binding stays with that RPC.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

from pdserve.telemetry import tracing

_request: contextvars.ContextVar[tuple[str, str | None, str | None] | None] = contextvars.ContextVar(
    "pdserve_log_request", default=None)

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(request_suffix)s"


def bind_request(request_id: str, span: trace.Span | None = None) -> None:
    """Tag this task's later log records with the request id (and the span's trace ids)."""
    ids = tracing.trace_ids(span) if span is not None else None
    _request.set((request_id, *(ids or (None, None))))


class RequestContextFilter(logging.Filter):
    """Adds request_id, trace_id, span_id (None when unbound) and request_suffix to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _request.get()
        record.request_id, record.trace_id, record.span_id = bound or (None, None, None)
        suffix = ""
        if bound is not None:
            suffix = f" [request_id={bound[0]}" + (f" trace_id={bound[1]}" if bound[1] else "") + "]"
        record.request_suffix = suffix
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, service, and the request,
    trace and span ids when bound (keys left out when unknown)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                 "service": self.service}
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(service: str, json_lines: bool = False, level: str = "INFO") -> None:
    """Replace the root logger's handlers with one on stderr, in JSON or text."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"--log-level {level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter(service) if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
