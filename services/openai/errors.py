"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure a handler meets becomes an OpenAIError, raised and turned into a response in one
place (the error middleware in app.py); a gRPC error from the router maps by its status code.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

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
    request field at fault, or None), code (a machine-readable reason, or None) and headers
    (extra HTTP headers of the response, e.g. Retry-After on a 429).
    """

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

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
