"""`pdserve serve openai`: the OpenAI-compatible HTTP server process, and `start_http`, which
starts the HTTP server for a Frontend with its transport bounds (limits.HttpOptions)."""

from __future__ import annotations

from aiohttp import web

from pdserve.openai.app import build_app
from pdserve.openai.frontend import Frontend
from pdserve.openai.limits import CONNECTION_GATE_KEY, HttpOptions
from pdserve.runtime.server import logger, run_server, wait_for_shutdown_signal
from pdserve.settings import OpenAISettings


def run_openai(settings: OpenAISettings) -> int:
    """Run the front end until SIGTERM/SIGINT."""
    return run_server(lambda: serve_openai(settings))


async def start_http(front: Frontend, host: str, port: int, options: HttpOptions | None = None) -> web.AppRunner:
    """Serve `front` on host:port (0: any free port; see runner.addresses) and return the runner
    (`await runner.cleanup()` stops it). Idle and slow-header connections close after
    keepalive_timeout_s, and the connection cap counts this server's connections."""
    options = options or HttpOptions()
    app = build_app(front, options)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # gRPC call, so the router aborts the request and frees its KV blocks at once.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, **options.handler_args())
    await runner.setup()
    app[CONNECTION_GATE_KEY].watch(runner.server)
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def serve_openai(settings: OpenAISettings) -> None:
    """Connect to the router, listen on the server's host and port, and serve until SIGTERM/SIGINT."""
    host, router = settings.server.host, settings.frontend.router
    front = await Frontend.connect(settings.frontend)
    try:
        runner = await start_http(front, host, settings.server.port, settings.http)
        try:
            port = runner.addresses[0][1]
            logger.info("OpenAI API for %s on http://%s:%d/v1 (router %s)", front.model_name, host, port, router)
            print(f"METRICS openai {host}:{port}", flush=True)  # /metrics is on the API port itself
            print(f"READY openai {host}:{port}", flush=True)
            await wait_for_shutdown_signal()
        finally:
            await runner.cleanup()
    finally:
        await front.close()
