"""What every pdserve server process shares: the grpc.aio server with health and reflection,
uvloop, the listening address, and running until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc

from services.grpc_common.health import add_health_and_reflection
from services.router.worker_clients import CHANNEL_OPTIONS

logger = logging.getLogger("pdserve")


async def start_grpc_server(register: Callable[[grpc.aio.Server], None], service_names: list[str],
                            host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Build, register services on, and start a grpc.aio server; returns (server, bound port)."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    register(server)
    await add_health_and_reflection(server, service_names)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound


async def wait_for_shutdown_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_server(main: Callable[[], Awaitable[None]]) -> int:
    """Run an async server main on uvloop (asyncio's loop where uvloop is missing)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(main())
    return 0
