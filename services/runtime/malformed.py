"""Requests whose bytes are not a valid protobuf message end with INVALID_ARGUMENT.

Left to itself, grpc.aio answers a request it cannot deserialize with UNKNOWN ("Unexpected
<class 'DecodeError'>") and logs a full traceback for each one, so a stream of garbage both
hides the cause from the client and floods the server's log. MalformedRequestInterceptor
wraps the deserializer of every unary-request method: a DecodeError becomes a
MalformedRequest value, and the wrapped handler ends the call with INVALID_ARGUMENT naming
the message type, before any servicer code runs. Streaming-request methods (reflection) are
left as they are.

    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse; `reason` is the parser's message."""

    reason: str


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` returning a MalformedRequest instead of raising on bad bytes."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return MalformedRequest(str(exc) or type(exc).__name__)
    return parse


def _details(request: MalformedRequest) -> str:
    return f"the request is not a valid protobuf message: {request.reason}"


def _guard_coroutine(behavior: Callable) -> Callable:
    """A unary-response handler, or a streaming one that writes with context.write."""
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
        return await behavior(request, context)
    return guarded


def _guard_async_generator(behavior: Callable) -> Callable:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
        # aclosing: when the call ends early, the servicer's own cleanup runs now.
        async with contextlib.aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response
    return guarded


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Server interceptor: INVALID_ARGUMENT for undecodable unary requests (see the module doc).
    The guarded handler is built per call (a few objects): caching it per method could reuse a
    handler that a later interceptor chose from one call's metadata."""

    async def intercept_service(self, continuation, handler_call_details):
        """The method's handler with a tolerant deserializer and a guard in front."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        return _wrap(handler) or handler


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
    """The guarded handler, or None for a kind this does not handle (sync behaviours)."""
    parse = tolerant(handler.request_deserializer)
    if not handler.response_streaming:
        if not inspect.iscoroutinefunction(handler.unary_unary):
            return None
        return grpc.unary_unary_rpc_method_handler(
            _guard_coroutine(handler.unary_unary), request_deserializer=parse,
            response_serializer=handler.response_serializer)
    behavior = handler.unary_stream
    if inspect.iscoroutinefunction(behavior):
        guarded = _guard_coroutine(behavior)
    elif inspect.isasyncgenfunction(behavior):
        guarded = _guard_async_generator(behavior)
    else:
        return None
    return grpc.unary_stream_rpc_method_handler(guarded, request_deserializer=parse,
                                                response_serializer=handler.response_serializer)
