"""`pdserve serve openai`: the OpenAI-compatible HTTP server process."""

from __future__ import annotations

import argparse

from aiohttp import web

from pdserve.openai.app import build_app
from pdserve.openai.frontend import Frontend, FrontendConfig
from pdserve.runtime.security import router_client_security
from pdserve.runtime.server import logger, wait_for_shutdown_signal


def parse_api_keys(raw: str | None) -> tuple[str, ...]:
    """Comma-separated API keys (blanks dropped); none means the API is open."""
    return tuple(k.strip() for k in (raw or "").split(",") if k.strip())


def config_from_args(ns: argparse.Namespace) -> FrontendConfig:
    """The front end's config from the `serve openai` flags."""
    if not ns.router:
        raise ValueError("--router HOST:PORT (or PDSERVE_ROUTER) is required")
    return FrontendConfig(router=ns.router, model_dir=ns.model, model_name=ns.model_name,
                          api_keys=parse_api_keys(ns.api_key), router_wait_s=ns.router_wait_s,
                          router_security=router_client_security(ns))


async def serve_openai(ns: argparse.Namespace) -> None:
    """Connect to the router, listen on --host:--port, and serve until SIGTERM/SIGINT."""
    front = await Frontend.connect(config_from_args(ns))
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # gRPC call, so the router aborts the request and frees its KV blocks at once.
    runner = web.AppRunner(build_app(front), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, ns.host, ns.port)
        await site.start()
        port = runner.addresses[0][1]
        logger.info("OpenAI API for %s on http://%s:%d/v1 (router %s)", front.model_name, ns.host, port, ns.router)
        print(f"METRICS openai {ns.host}:{port}", flush=True)  # /metrics is on the API port itself
        print(f"READY openai {ns.host}:{port}", flush=True)
        await wait_for_shutdown_signal()
    finally:
        await runner.cleanup()
        await front.link.close()
