"""API keys on gRPC: `authorization: Bearer KEY` metadata, checked by a server interceptor and
added by client interceptors.

The server checks only the services it protects (the public Router API); grpc.health.v1 and
server reflection stay open so that load balancers and probes work without a key. Keys are
compared in constant time, and every configured key is compared on every call. Within a call it
accepted, authenticated_key_identity() names the key (a hash of it, never the key), so the
servicer can bind what the call creates to whoever made it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
from collections.abc import Iterable

import grpc

AUTHORIZATION = "authorization"
_IDENTITY_DOMAIN = b"pdserve api key identity\0"

# Set by the interceptor inside each call it accepted; grpc.aio runs every call in its own
# task with a copy of the context, so one call's key never shows in another.
_key_identity: contextvars.ContextVar[str | None] = contextvars.ContextVar("pdserve_api_key_identity",
                                                                          default=None)


def parse_api_keys(raw: str | None) -> tuple[str, ...]:
    """Comma-separated API keys (blanks dropped); an empty tuple means no key is needed."""
    return tuple(k.strip() for k in (raw or "").split(",") if k.strip())


class ApiKeyChecker:
    """Accepts `Bearer KEY` for any of `keys`, in constant time (digests of equal length are
    compared against every key, so neither the match nor the key lengths leak through timing)."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        if not self._digests:
            raise ValueError("ApiKeyChecker needs at least one API key")

    def accepts(self, authorization: str | None) -> bool:
        """Whether the `authorization` header value carries an accepted key."""
        scheme = (authorization or "").partition(" ")[0]
        digest = hashlib.sha256(_bearer_token(authorization).encode()).digest()
        matched = False
        for key in self._digests:
            matched |= hmac.compare_digest(digest, key)
        return matched and scheme.lower() == "bearer"


def key_identity(key: str) -> str:
    """A stable name for an API key that does not reveal it: "key:" and 32 hex digits of a
    domain-separated SHA-256 (what request records store)."""
    return "key:" + hashlib.sha256(_IDENTITY_DOMAIN + key.encode()).hexdigest()[:32]


def authenticated_key_identity() -> str | None:
    """key_identity of the API key the running call was accepted with; None when no
    ApiKeyInterceptor checked the call (a deployment without keys)."""
    return _key_identity.get()


def _bearer_token(authorization: str | None) -> str:
    return (authorization or "").partition(" ")[2].strip()


def _header(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


# (request streaming, response streaming) -> the handler's behavior attribute and its constructor
_KINDS = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
          (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
          (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
          (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}


def _same_kind(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler` running `behavior`."""
    make = _KINDS[(handler.request_streaming, handler.response_streaming)][1]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _same_kind(handler, refuse)


def _with_identity(handler: grpc.RpcMethodHandler, identity: str) -> grpc.RpcMethodHandler:
    """`handler`, its behavior run after setting the call's key identity."""
    behavior = getattr(handler, _KINDS[(handler.request_streaming, handler.response_streaming)][0])
    if inspect.isasyncgenfunction(behavior):
        async def streaming(request, context):
            _key_identity.set(identity)
            # aclosing: a call that ends early runs the method's cleanup now, not at collection.
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        return _same_kind(handler, streaming)
    if inspect.iscoroutinefunction(behavior):
        async def unary(request, context):
            _key_identity.set(identity)
            return await behavior(request, context)
        return _same_kind(handler, unary)

    def synchronous(request, context):
        _key_identity.set(identity)
        return behavior(request, context)
    return _same_kind(handler, synchronous)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires an accepted `authorization: Bearer KEY` on every method of `services` (full
    names, e.g. "pdserve.v1.Router"); other services (health, reflection) pass untouched.
    A refused call ends with UNAUTHENTICATED before its handler runs."""

    def __init__(self, keys: Iterable[str], services: Iterable[str]):
        self.checker = ApiKeyChecker(keys)
        self.prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(self, continuation, handler_call_details):
        """Pass the call on, or replace its handler by a refusal."""
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefixes):
            return handler
        header = _header(handler_call_details.invocation_metadata)
        if self.checker.accepts(header):
            return _with_identity(handler, key_identity(_bearer_token(header)))
        reason = "no API key was sent" if header is None else "the API key is not valid"
        return _refusal(handler, f"{reason}: send gRPC metadata 'authorization: Bearer <key>' "
                                 "with a key the router accepts (--api-key)")


def _with_key(details, header: str):
    return details._replace(metadata=[*(details.metadata or ()), (AUTHORIZATION, header)])


class _AioBearerKey:
    def __init__(self, key: str):
        self.header = f"Bearer {key}"


class _AioUnaryUnaryKey(_AioBearerKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_key(client_call_details, self.header), request)


class _AioUnaryStreamKey(_AioBearerKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_key(client_call_details, self.header), request)


class _AioStreamUnaryKey(_AioBearerKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_key(client_call_details, self.header), request_iterator)


class _AioStreamStreamKey(_AioBearerKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_key(client_call_details, self.header), request_iterator)


def bearer_key_aio_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add `authorization: Bearer KEY` to every call of a grpc.aio channel (one
    per call kind: grpc.aio files an interceptor under the first kind it implements only)."""
    return [kind(key) for kind in (_AioUnaryUnaryKey, _AioUnaryStreamKey, _AioStreamUnaryKey, _AioStreamStreamKey)]


class BearerKeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call of a synchronous channel
    (use with grpc.intercept_channel)."""

    def __init__(self, key: str):
        self.header = f"Bearer {key}"

    def intercept_unary_unary(self, continuation, client_call_details, request):
        """Unary call with the key."""
        return continuation(_with_key(client_call_details, self.header), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        """Server-streaming call with the key."""
        return continuation(_with_key(client_call_details, self.header), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        """Client-streaming call with the key."""
        return continuation(_with_key(client_call_details, self.header), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        """Bidirectional call with the key."""
        return continuation(_with_key(client_call_details, self.header), request_iterator)
