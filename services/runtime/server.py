"""What every pdserve server process shares: the grpc.aio server with health and reflection,
uvloop, the listening address, running until SIGTERM/SIGINT, and the graceful stop after it
(health NOT_SERVING, drain in-flight requests within a deadline, stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from pdserve.runtime.channels import CHANNEL_OPTIONS
from pdserve.runtime.health import add_health_and_reflection
from pdserve.runtime.lifecycle import Lifecycle, ShutdownSignals
from pdserve.runtime.malformed import MalformedRequestInterceptor
from pdserve.runtime.tls import TlsConfig
from pdserve.telemetry.logs import configure_logging

# Clients ping every 10 s to find dead peers (CHANNEL_OPTIONS); the server must accept those
# pings during a long call that sends no data (a slow prefill) instead of closing the connection
# for "too many pings" (gRPC's default allows one per 5 min).
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                  ("grpc.http2.max_ping_strikes", 0)]

logger = logging.getLogger("pdserve")
STOP_GRACE_S = 1.0  # after draining: what grpc still gives calls that are ending


@dataclass
class RunningServer:
    """A started grpc.aio server, its bound port and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer


async def start_grpc_server(register: Callable[[grpc.aio.Server], None], service_names: list[str],
                            host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Build, register services on, and start a grpc.aio server; returns (server, bound port)."""
    running = await start_server_with_health(register, service_names, host, port)
    return running.server, running.port


async def start_server_with_health(register: Callable[[grpc.aio.Server], None], service_names: list[str],
                                   host: str, port: int, tls: TlsConfig | None = None,
                                   interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> RunningServer:
    """As start_grpc_server, keeping the health servicer (for the graceful stop). tls: listen
    with TLS (mutual when it has a CA) instead of plaintext; interceptors: e.g. the API-key check."""
    # Last in the chain: undecodable bytes get INVALID_ARGUMENT, after e.g. the API-key check.
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=[*interceptors, MalformedRequestInterceptor()])
    register(server)
    health_servicer = await add_health_and_reflection(server, service_names)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return RunningServer(server, bound, health_servicer)


async def drain_and_stop(running: RunningServer, lifecycle: Lifecycle, timeout_s: float,
                         signals: ShutdownSignals | None = None,
                         leave: Callable[[], Awaitable[None]] | None = None) -> bool:
    """The graceful stop: health NOT_SERVING, `leave()` (e.g. deregister from Redis), refuse
    new requests and wait up to timeout_s for those in flight (a second signal cuts it
    short), then stop the server. True when every request finished."""
    await running.health.enter_graceful_shutdown()
    lifecycle.accepting = False  # from now on: a request arriving while we deregister is refused too
    if leave is not None:
        try:
            await leave()
        except Exception as exc:  # noqa: BLE001 - Redis away: the TTL drops us anyway
            logger.warning("leaving the cluster failed: %s", exc)
    logger.info("draining: %d requests in flight, up to %.1f s", lifecycle.in_flight, timeout_s)
    drained = await lifecycle.drain(timeout_s, signals.forced if signals is not None else None)
    logger.info("drained" if drained else "drain deadline passed; stopping anyway")
    await running.server.stop(grace=STOP_GRACE_S if drained else 0)
    return drained


async def wait_for_shutdown_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_server(main: Callable[[], Awaitable[None]]) -> int:
    """Run an async server main on uvloop (asyncio's loop where uvloop is missing)."""
    # Escaped text lines from the first one on; the role's telemetry settings may replace this.
    configure_logging("pdserve")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(main())
    return 0
