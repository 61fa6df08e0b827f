"""Every bound the HTTP front end puts on what a client controls, checked before the work it
would cost: body bytes and read time, connections, chat messages and characters, prompts, list
lengths, integer and float ranges (the router's protobuf field types), and the threads that
render and tokenize chat prompts.

The values are module constants (the README's "OpenAI-compatible API" section lists them);
`HttpOptions` carries the transport ones into an application so tests can shorten them.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# -- HTTP transport --------------------------------------------------------------------------
MAX_BODY_BYTES = 8 * 2**20  # a request body; over it: 413 (on Content-Length, before reading)
BODY_READ_TIMEOUT_S = 30.0  # the whole body must arrive within this; else 408 and the connection closes
# An idle keep-alive connection closes after this. aiohttp's timer also runs while a request's
# headers are incomplete (from the connection's start or the previous response), so it bounds
# slow headers too.
KEEPALIVE_TIMEOUT_S = 15.0
# A server-sent event that cannot be written for this long (the client stopped reading) ends the
# stream: the connection is dropped and the router's request cancelled.
STREAM_WRITE_TIMEOUT_S = 30.0
LINGER_S = 2.0  # after an early answer (413, 408...), unread body bytes are drained this long, then close
MAX_CONNECTIONS = 512  # open connections; a request on one beyond it gets 503 + Retry-After
MAX_LINE_SIZE = 8190  # bytes of the request line and of each header line (aiohttp's default)
MAX_FIELD_SIZE = 8190  # bytes of one header value
MAX_HEADERS = 64  # header lines per request
RETRY_AFTER_S = 1  # Retry-After of the front end's own 503s

# -- Chat prompts (checked before the template runs) -------------------------------------------
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256  # text parts in one message's content list
MAX_MESSAGE_CHARS = 1_000_000  # one message: its content plus its other fields as JSON text
MAX_CHAT_CHARS = 1_000_000  # all messages and chat_template_kwargs together (the router's text cap)
MAX_RENDERED_CHARS = 2_000_000  # the template's output, before tokenizing
PREPARE_THREADS = 2  # threads rendering and tokenizing chat prompts, off the event loop
MAX_PREPARING = 16  # chat prompts rendering, tokenizing or waiting for a thread; beyond: 503

# -- Completion prompts and sampling lists ---------------------------------------------------
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_PROMPT_CHARS = 1_000_000  # one text prompt (the router's own limit, router/servicer.py)
MAX_STOP_TOKEN_IDS = 1024
# A token-id prompt must leave room for a token: fewer ids than the model's max_model_len.

# -- Ranges of the router's protobuf fields (protos/pdserve/v1/router.proto) --------------------
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# Sampling floats travel as float32: a nonzero value below this would arrive subnormal or as 0.
FLOAT32_MIN_NORMAL = 2.0**-126
# When Python refuses a body's integer (over 4300 digits), the body is parsed again with every
# integer longer than this read as NumberTooLarge (no field takes one), so the field is named.
MAX_INT_DIGITS = 100


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP transport's bounds for one application (defaults: the constants above)."""

    max_body_bytes: int = MAX_BODY_BYTES
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    stream_write_timeout_s: float = STREAM_WRITE_TIMEOUT_S
    linger_s: float = LINGER_S
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "body_read_timeout_s", "keepalive_timeout_s", "stream_write_timeout_s",
                     "max_connections"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HTTP option {name} must be > 0, got {getattr(self, name)!r}")
        if self.linger_s < 0:
            raise ValueError(f"HTTP option linger_s must be >= 0, got {self.linger_s!r}")

    def handler_args(self) -> dict[str, Any]:
        """Keyword arguments for aiohttp's request handler (web.AppRunner passes them on)."""
        return {"keepalive_timeout": self.keepalive_timeout_s, "lingering_time": self.linger_s,
                "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE, "max_headers": MAX_HEADERS}


class ConnectionGate:
    """Counts the open connections of the aiohttp server it watches (none until `watch`: an app
    run some other way is not capped)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.server: web.Server | None = None

    def watch(self, server: web.Server | None) -> None:
        """Count `server`'s connections from now on."""
        self.server = server

    def over_capacity(self) -> bool:
        """Whether more connections are open than allowed (the asking one included)."""
        return self.server is not None and len(self.server.connections) > self.max_connections


HTTP_OPTIONS_KEY = web.AppKey("http_options", HttpOptions)
CONNECTION_GATE_KEY = web.AppKey("connection_gate", ConnectionGate)


class NumberTooLarge:
    """A JSON integer of more than MAX_INT_DIGITS digits (Python refuses int() beyond 4300): the
    body parser puts this in its place, so the field holding it is named as out of range."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def bounded_int(literal: str) -> int | NumberTooLarge:
    """json's parse_int: the integer, or NumberTooLarge for one too long to convert."""
    digits = len(literal.lstrip("-"))
    return int(literal) if digits <= MAX_INT_DIGITS else NumberTooLarge(digits)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """repr(value) cut to a few dozen characters, for error messages (never raises for big ints)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # ints over 4300 digits inside a container
        return f"<a {type(value).__name__}>"

