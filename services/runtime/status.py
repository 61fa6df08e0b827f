"""The one place where exceptions become gRPC status codes, for grpc.aio servicers.

    class RouterServicer(router_pb2_grpc.RouterServicer):
        @map_errors
        async def Generate(self, request, context): ...   # async generator or coroutine

An exception escaping a decorated method aborts the call with the code of the first class in
the exception's MRO listed below (so a subclass of NotFoundError is NOT_FOUND) and its
message as the details; an error from a downstream pdserve call (grpc.aio.AioRpcError) keeps
its code and details; anything else is INTERNAL and logged with its traceback. A
RESOURCE_EXHAUSTED carries a retry hint (see retry_hint.py): the OverloadedError's
retry_after_ms, or the downstream server's, or the default.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from pdserve.models.sampling_params import SamplingParamsError
from pdserve.runtime.errors import (
    AlreadyExistsError,
    IncompatiblePeerError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PromptTooLongError,
    UnavailableError,
)
from pdserve.runtime.retry_hint import (
    DEFAULT_RETRY_AFTER_MS,
    overload_trailing_metadata,
    retry_after_ms_of,
)

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
STATUS_BY_EXCEPTION: dict[type[BaseException], grpc.StatusCode] = {
    PromptTooLongError: Code.OUT_OF_RANGE,
    InvalidRequestError: Code.INVALID_ARGUMENT,
    SamplingParamsError: Code.INVALID_ARGUMENT,
    OverloadedError: Code.RESOURCE_EXHAUSTED,
    NotFoundError: Code.NOT_FOUND,
    AlreadyExistsError: Code.ALREADY_EXISTS,
    UnavailableError: Code.UNAVAILABLE,
    IncompatiblePeerError: Code.FAILED_PRECONDITION,
    ValueError: Code.INVALID_ARGUMENT,
    TimeoutError: Code.DEADLINE_EXCEEDED,
    NotImplementedError: Code.UNIMPLEMENTED,
}

Method = TypeVar("Method", bound=Callable[..., Any])


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details message that `error` becomes."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    for cls in type(error).__mro__:
        code = STATUS_BY_EXCEPTION.get(cls)
        if code is not None:
            return code, str(error) or cls.__name__
    return Code.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def map_errors(method: Method) -> Method:
    """Decorate a grpc.aio servicer method (coroutine or async generator, the context as last
    positional argument) so exceptions end the call with their mapped status. Cancellation
    and aborts the method did itself pass through unchanged."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def streaming(*args: Any) -> Any:
            try:
                # aclosing: when the call ends early, the method's own cleanup (finally blocks
                # that abort the request and free its blocks) runs now, not at garbage collection.
                async with contextlib.aclosing(method(*args)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - the boundary that maps every error
                await _abort(args[-1], error)
        return streaming  # type: ignore[return-value]
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def unary(*args: Any) -> Any:
            try:
                return await method(*args)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - the boundary that maps every error
                await _abort(args[-1], error)
        return unary  # type: ignore[return-value]
    raise TypeError(f"map_errors needs an async def method or async generator, got {method!r}")


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    code, details = status_for(error)
    if code == Code.INTERNAL:
        logger.exception("servicer failed: %s", details)
    else:
        logger.debug("request ended with %s: %s", code.name, details)
    if code == Code.RESOURCE_EXHAUSTED:
        await context.abort(code, details, overload_trailing_metadata(_retry_after_ms(error), details))
    await context.abort(code, details)


def _retry_after_ms(error: Exception) -> int:
    """The retry hint a RESOURCE_EXHAUSTED carries: the OverloadedError's own, else a downstream
    server's (the error itself, or the one an OverloadedError was raised from), else the default."""
    hint = error.retry_after_ms if isinstance(error, OverloadedError) else retry_after_ms_of(error)
    if hint is None and error.__cause__ is not None:
        hint = retry_after_ms_of(error.__cause__)
    return DEFAULT_RETRY_AFTER_MS if hint is None else hint
