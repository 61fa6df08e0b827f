"""The OpenAI request protocol: reading a request's JSON fields, turning them into the router's
SamplingParams, and OpenAI's error shape with its HTTP status.

Fields: absent and null read as None (the caller applies the default), as OpenAI's API does; a
wrong type or range is a 400 that names the field. Sampling: OpenAI names map one to one
(max_tokens, temperature, top_p, n, stop, seed, presence_penalty, frequency_penalty); chat's
max_completion_tokens is max_tokens and its logprobs/top_logprobs become the router's `logprobs`
count. vLLM's extensions top_k, min_p, repetition_penalty, ignore_eos, min_tokens and
stop_token_ids pass through. Ranges are the router's (see models/sampling_params.py).

Errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status. Every failure a
handler meets becomes an OpenAIError, raised and turned into a response in one place (the error
middleware in app.py); a gRPC error from the router maps by its status code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from pdserve.models.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams, SamplingParamsError
from pdserve.runtime.retry_hint import DEFAULT_RETRY_AFTER_MS, retry_after_ms_of
from pdserve.v1 import router_pb2

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

SEED_MIN, SEED_LIMIT = -(2**63), 2**64  # negative seeds (int64, as clients send) wrap to uint64


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


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; a 400 when the body is not one."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def opt_int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    """body[name] as an int in [lo, hi] (bounds optional), or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise invalid(f"{name} must be an integer, got {value!r}", name)
    _check_range(name, value, lo, hi)
    return value


def opt_float(body: dict[str, Any], name: str, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> float | None:
    """body[name] as a float in [lo, hi] ((lo, hi] with lo_open), or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(f"{name} must be a number, got {value!r}", name)
    value = float(value)
    if lo_open and lo is not None and value <= lo:
        raise invalid(f"{name} must be > {lo} and <= {hi}, got {value}", name)
    _check_range(name, value, lo, hi)
    return value


def opt_bool(body: dict[str, Any], name: str) -> bool | None:
    """body[name] as a bool, or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean, got {value!r}", name)
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
    """body[name] as a list of 1..max_chars-character strings (a lone string is a list of one);
    [] when absent/null."""
    value = body.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"{name} must be a string or a list of strings", name)
    if len(items) > max_items:
        raise invalid(f"{name} has {len(items)} entries; at most {max_items} are allowed", name)
    for s in items:
        if not 0 < len(s) <= max_chars:
            raise invalid(f"each {name} entry must have 1 to {max_chars} characters", name)
    return items


def int_list(body: dict[str, Any], name: str, lo: int = 0) -> list[int]:
    """body[name] as a list of ints >= lo; [] when absent/null."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(v) and v >= lo for v in value):
        raise invalid(f"{name} must be a list of integers >= {lo}", name)
    return value


def reject_if_set(body: dict[str, Any], name: str, allowed: tuple[Any, ...] = (None,)) -> None:
    """A 400 naming `name` when the request sets it to something this server does not support."""
    if body.get(name, None) not in allowed:
        raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise invalid(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise invalid(f"{name} must be <= {hi}, got {value}", name)


def read_stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage); stream_options is only allowed with stream true, as OpenAI says."""
    stream = bool(opt_bool(body, "stream"))
    options = opt_dict(body, "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options can only be set when stream is true", "stream_options")
    include_usage = bool(opt_bool(options or {}, "include_usage"))
    return stream, include_usage


@dataclass(frozen=True)
class Limits:
    """What the served model allows, from the router's GetModelInfo."""

    max_model_len: int
    max_n: int
    max_logprobs: int


def read_sampling(body: dict[str, Any], limits: Limits, chat: bool) -> dict[str, Any]:
    """The validated sampling fields the request sets, under the router's names (max_tokens may
    be absent: the caller picks the default). Raises OpenAIError (400) naming a bad field."""
    fields: dict[str, Any] = {}
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    _put(fields, "max_tokens", opt_int(body, max_name, 1, limits.max_model_len))
    _put(fields, "temperature", opt_float(body, "temperature", 0.0, 100.0))
    _put(fields, "top_p", opt_float(body, "top_p", 0.0, 1.0, lo_open=True))
    _put(fields, "top_k", opt_int(body, "top_k", -1))
    _put(fields, "min_p", opt_float(body, "min_p", 0.0, 1.0))
    _put(fields, "repetition_penalty", opt_float(body, "repetition_penalty", 0.0, 10.0, lo_open=True))
    _put(fields, "presence_penalty", opt_float(body, "presence_penalty", -2.0, 2.0))
    _put(fields, "frequency_penalty", opt_float(body, "frequency_penalty", -2.0, 2.0))
    seed = opt_int(body, "seed", SEED_MIN, SEED_LIMIT - 1)
    _put(fields, "seed", None if seed is None else seed % SEED_LIMIT)
    _put(fields, "n", opt_int(body, "n", 1, limits.max_n))
    _put(fields, "min_tokens", opt_int(body, "min_tokens", 0))
    _put(fields, "logprobs", _read_logprobs(body, limits, chat))
    fields["stop"] = str_list(body, "stop", MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS)
    fields["stop_token_ids"] = int_list(body, "stop_token_ids")
    fields["ignore_eos"] = bool(opt_bool(body, "ignore_eos"))
    if "min_tokens" in fields and fields["min_tokens"] > fields.get("max_tokens", SamplingParams.max_tokens):
        raise invalid("min_tokens must not exceed max_tokens", "min_tokens")
    return fields


def _read_logprobs(body: dict[str, Any], limits: Limits, chat: bool) -> int | None:
    """Completions: logprobs is the top-N count. Chat: logprobs is a bool and top_logprobs the
    count (which needs logprobs true)."""
    if not chat:
        return opt_int(body, "logprobs", 0, limits.max_logprobs)
    wanted = opt_bool(body, "logprobs")
    top = opt_int(body, "top_logprobs", 0, limits.max_logprobs)
    if top is not None and not wanted:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    return (top or 0) if wanted else None


def to_proto(fields: dict[str, Any]) -> router_pb2.SamplingParams:
    """The router message for fields from read_sampling (after a final cross-field check by the
    SamplingParams dataclass itself)."""
    try:
        SamplingParams(**fields)
    except SamplingParamsError as exc:
        raise invalid(str(exc), str(exc).split(" ", 1)[0]) from exc
    return router_pb2.SamplingParams(**fields)


def _put(fields: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        fields[name] = value
