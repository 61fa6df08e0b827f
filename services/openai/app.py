"""The aiohttp application: routes, and the middlewares for metrics, errors, the connection cap
and API keys.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model},
GET /health (the router's health), GET /metrics. Only /v1/* needs an API key (when keys are
configured), so probes and scrapers need none; they are also answered over the connection cap.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from pdserve.openai.endpoints import create_chat_completion, create_completion
from pdserve.openai.frontend import FRONTEND_KEY, Frontend, frontend_of
from pdserve.openai.limits import CONNECTION_GATE_KEY, HTTP_OPTIONS_KEY, RETRY_AFTER_S, ConnectionGate, HttpOptions
from pdserve.openai.metrics import CONTENT_TYPE
from pdserve.openai.protocol import INVALID_REQUEST, UNAVAILABLE, OpenAIError, internal

logger = logging.getLogger("pdserve.openai")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNCAPPED_PATHS = ("/health", "/metrics")  # cheap, and what tells an orchestrator how the server is


def build_app(front: Frontend, options: HttpOptions | None = None) -> web.Application:
    """The application serving `front`'s model under `options` (the limits.py defaults when
    None). The connection cap applies once a server is watched (see server.start_http)."""
    options = options or HttpOptions()
    app = web.Application(middlewares=[_metrics_middleware, _error_middleware, _connection_cap_middleware,
                                       _auth_middleware], client_max_size=options.max_body_bytes)
    app[FRONTEND_KEY] = front
    app[HTTP_OPTIONS_KEY] = options
    app[CONNECTION_GATE_KEY] = ConnectionGate(options.max_connections)
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model}", _get_model)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


def _model_card(front: Frontend) -> dict:
    return {"id": front.model_name, "object": "model", "created": front.created, "owned_by": "pdserve",
            "max_model_len": front.limits.max_model_len}


async def _list_models(request: web.Request) -> web.Response:
    front = frontend_of(request)
    return web.json_response({"object": "list", "data": [_model_card(front)]})


async def _get_model(request: web.Request) -> web.Response:
    front = frontend_of(request)
    front.check_model({"model": request.match_info["model"]})
    return web.json_response(_model_card(front))


async def _health(request: web.Request) -> web.Response:
    front = frontend_of(request)
    if await front.link.healthy():
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "router unavailable"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    front = frontend_of(request)
    # CONTENT_TYPE carries a version parameter besides the charset, which web.Response's
    # content_type/charset arguments cannot express: it goes in as a header.
    return web.Response(body=front.metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


def _endpoint(request: web.Request) -> str:
    """The route's path pattern as a metrics label ("unmatched" for 404s: no unbounded labels)."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    front = frontend_of(request)
    start = time.perf_counter()
    status = 499  # the client went away before a response (nginx's convention)
    front.metrics.in_flight.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        front.metrics.in_flight.dec()
        front.metrics.observe_request(_endpoint(request), status, time.perf_counter() - start)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as OpenAI's JSON: ours, aiohttp's (404 route, 405 method, 413 body) and bugs."""
    try:
        return await handler(request)
    except OpenAIError as error:
        response = web.json_response(error.body(), status=error.status, headers=error.headers)
        if error.close:
            response.force_close()
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = error.reason if error.status != 404 else f"Invalid URL ({request.method} {request.path})"
        code = "unknown_url" if error.status == 404 else None
        body = OpenAIError(error.status, message, INVALID_REQUEST, None, code).body()
        return web.json_response(body, status=error.status, headers=_allow_header(error))
    except ConnectionResetError:  # the client went away mid-response: nobody to answer
        raise
    except Exception as error:  # noqa: BLE001 - the boundary that turns bugs into a 500 body
        logger.exception("request failed: %s %s", request.method, request.path)
        return web.json_response(internal(error).body(), status=500)


def _allow_header(error: web.HTTPException) -> dict[str, str]:
    allow = error.headers.get("Allow")
    return {"Allow": allow} if allow else {}


@web.middleware
async def _connection_cap_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """503 + Retry-After for a request on a connection beyond the cap (that connection closes)."""
    if request.path not in UNCAPPED_PATHS and request.app[CONNECTION_GATE_KEY].over_capacity():
        cap = request.app[CONNECTION_GATE_KEY].max_connections
        raise OpenAIError(503, f"the server has more than {cap} connections open; retry shortly", UNAVAILABLE,
                          None, "too_many_connections", {"Retry-After": str(RETRY_AFTER_S)}, close=True)
    return await handler(request)


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = frontend_of(request).config.api_keys
    if keys and request.path.startswith("/v1/"):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k.encode())
                                                  for k in keys):
            message = ("Incorrect API key provided." if header else
                       "No API key provided: send it as 'Authorization: Bearer KEY'.")
            raise OpenAIError(401, message, INVALID_REQUEST, None, "invalid_api_key")
    return await handler(request)
