"""Process logging: plain text or one JSON object per line (`--log-json`), each record carrying
the request id and the trace/span ids of the request it belongs to.

A servicer calls bind_request(request_id, span) at the start of an RPC. grpc.aio runs every
RPC in its own task with a copy of the context, so the binding stays with that RPC.

Text that came from a client (a request id, a prompt in an error message) must not forge log
lines: the text format writes control characters as backslash escapes (a newline as the two
characters backslash and n) and indents the lines of a traceback, so a line that starts at
column 0 always starts a record. JSON lines escape them by themselves.
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


def _escapes() -> dict[int, str]:
    """str.translate table: C0 and C1 controls, DEL and the Unicode line and paragraph
    separators (some viewers break lines there) to backslash escapes."""
    codes = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
    table = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in codes}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    return table


_ESCAPES = _escapes()
TRACEBACK_INDENT = "    "


def escape_controls(text: str) -> str:
    """`text` with every control character written as a backslash escape (one line)."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT lines, one per record: the line (message, its arguments, the request suffix)
    with control characters escaped; a traceback follows on lines indented by TRACEBACK_INDENT,
    each escaped the same way."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line, escaped."""
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        """The traceback, each line escaped and indented."""
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        """The stack, each line escaped and indented."""
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(TRACEBACK_INDENT + escape_controls(line) for line in text.splitlines())


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
    handler.setFormatter(JsonFormatter(service) if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
