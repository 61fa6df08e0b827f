"""Graceful shutdown: a server that got SIGTERM stops taking new requests, finishes the ones in
flight within a deadline, then exits.

    lifecycle = Lifecycle()
    lifecycle.check_accepting("Reserve")     # in an RPC that starts new work: DrainingError once draining
    with lifecycle.track():                  # around work in flight (a stream, a background transfer)
        ...
    lifecycle.add_source(lambda: len(open_reservations))   # other work in flight, counted on demand
    drained = await lifecycle.drain(timeout_s, forced)      # after health NOT_SERVING + deregistration

RPCs that continue work already accepted (a decode server's Decode of a reservation it granted,
Abort, GetLoad) are still served while draining. The router retries a refused Reserve or
Prefill on another worker (is_draining_refusal), so a request racing the shutdown still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator

import grpc

from pdserve.runtime.errors import UnavailableError

logger = logging.getLogger("pdserve.lifecycle")

DRAINING_DETAILS = "the server is shutting down and takes no new requests"
DRAIN_POLL_S = 0.05


class DrainingError(UnavailableError):
    """A new request reached a draining server (UNAVAILABLE; the router tries another)."""

    def __init__(self, what: str):
        super().__init__(f"{DRAINING_DETAILS} ({what} refused)")


def is_draining_refusal(error: BaseException) -> bool:
    """True for the UNAVAILABLE a draining pdserve server answers a new request with."""
    return (isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
            and (error.details() or "").startswith(DRAINING_DETAILS))


class Lifecycle:
    """Whether this server takes new requests, and how much work it has in flight."""

    def __init__(self) -> None:
        self.accepting = True
        self._tracked = 0
        self._sources: list[Callable[[], int]] = []

    def check_accepting(self, what: str) -> None:
        """Raise DrainingError when the server is draining."""
        if not self.accepting:
            raise DrainingError(what)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed work as in flight."""
        self._tracked += 1
        try:
            yield
        finally:
            self._tracked -= 1

    def add_source(self, count: Callable[[], int]) -> None:
        """Also count count() items as in flight (read while draining)."""
        self._sources.append(count)

    @property
    def in_flight(self) -> int:
        """Tracked work plus every source's count."""
        return self._tracked + sum(source() for source in self._sources)

    async def drain(self, timeout_s: float, forced: asyncio.Event | None = None) -> bool:
        """Stop accepting and wait until nothing is in flight, timeout_s passes, or `forced`
        is set; True when everything finished."""
        self.accepting = False
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self.in_flight > 0 and time.monotonic() < deadline:
            if forced is not None and forced.is_set():
                break
            await asyncio.sleep(DRAIN_POLL_S)
        left = self.in_flight
        if left:
            logger.warning("drain ended with %d requests still in flight", left)
        return left == 0


class ShutdownSignals:
    """SIGTERM/SIGINT handling for a server: the first signal sets `requested` (drain), a
    second one sets `forced` (stop now)."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.requested.is_set():
            self.forced.set()
        self.requested.set()

    async def wait(self) -> None:
        """Return once a first signal came."""
        await self.requested.wait()
