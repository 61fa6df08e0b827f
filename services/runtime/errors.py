"""Exceptions for requests pdserve refuses or cannot serve; status.py maps each to a gRPC code.

They carry no gRPC dependency so the engine and other non-gRPC code can raise them. Subclass
one of them for a new case: the status mapping follows the class hierarchy.
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base of pdserve's request errors; the message is sent to the client as the details."""


class InvalidRequestError(PdserveError, ValueError):
    """The request is malformed (a missing or out-of-range field): INVALID_ARGUMENT."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus max_tokens exceeds the model's or the server's length limit: OUT_OF_RANGE."""


class OverloadedError(PdserveError):
    """The server cannot take the request now (queue or KV blocks full); the client may retry
    later: RESOURCE_EXHAUSTED. retry_after_ms: the hint sent with it (trailing metadata
    `retry-after-ms` and a google.rpc.RetryInfo); None: the default hint."""

    def __init__(self, message: str = "", retry_after_ms: int | None = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NotFoundError(PdserveError):
    """A named thing does not exist (unknown request id, expired reservation): NOT_FOUND."""


class AlreadyExistsError(PdserveError):
    """A request with this id is already running: ALREADY_EXISTS."""


class UnavailableError(PdserveError):
    """No server can serve the request right now (workers down, shutting down): UNAVAILABLE."""


class IncompatiblePeerError(PdserveError):
    """Another pdserve server refused this one as a peer (a KV cache layout that differs, KV
    credentials it does not accept): a deployment to fix, not a request to retry: FAILED_PRECONDITION."""
