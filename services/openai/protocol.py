"""The OpenAI request protocol: reading a request's JSON fields, and OpenAI's error shape with
its HTTP status (sampling.py turns the sampling fields into the router's message).

Fields: absent and null read as None (the caller applies the default), as OpenAI's API does; a
wrong type or range is a 400 that names the field. Integers are checked against explicit bounds
(the protobuf field's type at most), floats against float32's normal range, list lengths before
their items, and strings for lone surrogates (see limits.py).

Errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status. Every failure a
handler meets becomes an OpenAIError, raised and turned into a response in one place (the error
middleware in app.py); a gRPC error from the router maps by its status code.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

from pdserve.openai.limits import FLOAT32_MIN_NORMAL, NumberTooLarge, short_repr
from pdserve.runtime.retry_hint import DEFAULT_RETRY_AFTER_MS, retry_after_ms_of

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

# gRPC status of a router call -> (HTTP status, OpenAI error type, OpenAI error code).
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, INVALID_REQUEST, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, INVALID_REQUEST, "context_length_exceeded"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, INVALID_REQUEST, None),
    grpc.StatusCode.NOT_FOUND: (404, INVALID_REQUEST, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, INVALID_REQUEST, "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, RATE_LIMIT, "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, UNAVAILABLE, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, SERVER_ERROR, "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, SERVER_ERROR, "not_implemented"),
}


class OpenAIError(Exception):
    """A request that ends with an OpenAI error body and `status`.

    Attributes: status (HTTP code), message, type (e.g. "invalid_request_error"), param (the
    request field at fault, or None), code (a machine-readable reason, or None), headers
    (extra HTTP headers of the response, e.g. Retry-After on a 429) and close (end the
    connection after the response: the rest of the request cannot be trusted or waited for).
    """

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.close = close

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 invalid_request_error naming the request field `param`."""
    return OpenAIError(400, message, INVALID_REQUEST, param, code)


def from_rpc_error(error: grpc.aio.AioRpcError, param: str | None = None) -> OpenAIError:
    """The OpenAIError for a failed router call: INVALID_ARGUMENT/OUT_OF_RANGE -> 400 (with
    `param` for the prompt-length case), RESOURCE_EXHAUSTED -> 429 with a Retry-After header
    (the router's retry hint in whole seconds, rounded up), UNAVAILABLE -> 503, an unexpected
    code -> 500."""
    code = error.code()
    status, kind, reason = _GRPC_TO_HTTP.get(code, (500, SERVER_ERROR, "internal_error"))
    details = error.details() or code.name
    headers = {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint_ms = retry_after_ms_of(error)
        headers["Retry-After"] = str(retry_after_seconds(DEFAULT_RETRY_AFTER_MS if hint_ms is None else hint_ms))
    return OpenAIError(status, details, kind, param if code == grpc.StatusCode.OUT_OF_RANGE else None,
                       reason, headers)


def retry_after_seconds(retry_after_ms: int) -> int:
    """An HTTP Retry-After value (whole seconds) for a hint in milliseconds, rounded up."""
    return math.ceil(max(0, retry_after_ms) / 1000)


def internal(error: BaseException) -> OpenAIError:
    """A 500 server_error for an unexpected exception (its type named, no traceback)."""
    return OpenAIError(500, f"internal error: {type(error).__name__}: {error}", SERVER_ERROR,
                       None, "internal_error")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def opt_int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    """body[name] as an int in [lo, hi], or None when absent/null. The bounds are required: the
    value goes into a fixed-width protobuf field."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, NumberTooLarge):
        raise invalid(f"{name} must be in [{lo}, {hi}], got {value!r}", name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise invalid(f"{name} must be an integer, got {short_repr(value)}", name)
    _check_range(name, value, lo, hi)
    return value


def opt_float(body: dict[str, Any], name: str, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> float | None:
    """body[name] as a float in [lo, hi] ((lo, hi] with lo_open), or None when absent/null. A
    nonzero value too small for a normal float32 (the router's type) is a 400, not a silent 0."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, NumberTooLarge):
        raise invalid(f"{name} must be in [{lo}, {hi}], got {value!r}", name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(f"{name} must be a number, got {short_repr(value)}", name)
    try:
        value = float(value)
    except OverflowError as exc:  # an int beyond float's range
        raise invalid(f"{name} must be in [{lo}, {hi}], got {short_repr(value)}", name) from exc
    if lo_open and lo is not None and value <= lo:
        raise invalid(f"{name} must be > {lo} and <= {hi}, got {value}", name)
    _check_range(name, value, lo, hi)
    if value != 0 and abs(value) < FLOAT32_MIN_NORMAL:
        raise invalid(f"{name} must be 0 or at least {FLOAT32_MIN_NORMAL:.4g} in magnitude (it travels as a "
                      f"32-bit float), got {value!r}", name)
    return value


def opt_bool(body: dict[str, Any], name: str) -> bool | None:
    """body[name] as a bool, or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean, got {short_repr(value)}", name)
    return value


def opt_dict(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    """body[name] as a JSON object, or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object, got {type(value).__name__}", name)
    return value


def str_list(body: dict[str, Any], name: str, max_items: int, max_chars: int) -> list[str]:
    """body[name] as a list of 1..max_chars-character strings of valid Unicode (a lone string is
    a list of one); [] when absent/null."""
    value = body.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and len(items) > max_items:
        raise invalid(f"{name} has {len(items)} entries; at most {max_items} are allowed", name)
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"{name} must be a string or a list of strings", name)
    for s in items:
        if not 0 < len(s) <= max_chars:
            raise invalid(f"each {name} entry must have 1 to {max_chars} characters", name)
        require_text(s, name, f"a {name} entry")
    return items


def int_list(body: dict[str, Any], name: str, lo: int, hi: int, max_items: int) -> list[int]:
    """body[name] as a list of at most max_items ints in [lo, hi]; [] when absent/null."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, list) and len(value) > max_items:
        raise invalid(f"{name} has {len(value)} entries; at most {max_items} are allowed", name)
    if not isinstance(value, list) or not all(_is_int(v) and lo <= v <= hi for v in value):
        raise invalid(f"{name} must be a list of integers in [{lo}, {hi}]", name)
    return value


def require_text(text: str, param: str, what: str) -> None:
    """A 400 naming `param` when `text` is not valid Unicode (a lone UTF-16 surrogate, from a
    JSON escape like \\ud800): neither the tokenizer nor protobuf can carry it."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"{what} contains a lone UTF-16 surrogate ({text[exc.start]!r} at character {exc.start}); "
                      "send valid Unicode text", param) from exc


def reject_if_set(body: dict[str, Any], name: str, allowed: tuple[Any, ...] = (None,)) -> None:
    """A 400 naming `name` when the request sets it to something this server does not support."""
    if body.get(name, None) not in allowed:
        raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise invalid(f"{name} must be >= {lo}, got {short_repr(value)}", name)
    if hi is not None and value > hi:
        raise invalid(f"{name} must be <= {hi}, got {short_repr(value)}", name)


def read_stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage); stream_options is only allowed with stream true, as OpenAI says."""
    stream = bool(opt_bool(body, "stream"))
    options = opt_dict(body, "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options can only be set when stream is true", "stream_options")
    include_usage = bool(opt_bool(options or {}, "include_usage"))
    return stream, include_usage
