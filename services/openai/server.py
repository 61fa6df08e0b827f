"""`pdserve serve openai`: the OpenAI-compatible HTTP server process."""

from __future__ import annotations

from aiohttp import web

from pdserve.openai.app import build_app
from pdserve.openai.frontend import Frontend
from pdserve.runtime.server import logger, run_server, wait_for_shutdown_signal
from pdserve.settings import OpenAISettings


def run_openai(settings: OpenAISettings) -> int:
    """Run the front end until SIGTERM/SIGINT."""
    return run_server(lambda: serve_openai(settings))


async def serve_openai(settings: OpenAISettings) -> None:
    """Connect to the router, listen on the server's host and port, and serve until SIGTERM/SIGINT."""
    host, router = settings.server.host, settings.frontend.router
    front = await Frontend.connect(settings.frontend)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # gRPC call, so the router aborts the request and frees its KV blocks at once.
    runner = web.AppRunner(build_app(front), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, settings.server.port)
        await site.start()
        port = runner.addresses[0][1]
        logger.info("OpenAI API for %s on http://%s:%d/v1 (router %s)", front.model_name, host, port, router)
        print(f"METRICS openai {host}:{port}", flush=True)  # /metrics is on the API port itself
        print(f"READY openai {host}:{port}", flush=True)
        await wait_for_shutdown_signal()
    finally:
        await runner.cleanup()
        await front.link.close()
