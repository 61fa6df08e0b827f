"""Waiting for Redis: a call that finds Redis unreachable is retried with short backoff until a
deadline, then fails with UnavailableError (gRPC UNAVAILABLE) naming the server and the error.

Each attempt runs in a task of its own, awaited through asyncio.shield: redis-py's asyncio client
can swallow a task's cancellation that lands mid-command (measured with redis 8.2: about one
cancel in three went missing), which would keep a request whose client left running until its
next write. Shielded, the caller is cancelled at once and the command finishes on its own.

    wait = RedisWait(redact_url(ns.redis_url), wait_s=5.0)   # redact_url: pdserve.state.redis_connect
    created = await wait.call(lambda: redis.eval(...))
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.exceptions

from pdserve.runtime.errors import UnavailableError

T = TypeVar("T")

# What "Redis is away" looks like: refused or dropped connections (redis-py's ConnectionError,
# which BusyLoadingError subclasses), socket timeouts, and raw socket errors (TimeoutError is
# an OSError too, so an attempt cut short by the deadline counts).
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def url_of(client) -> str:
    """A redis:// URL describing a redis.asyncio client's server (no password), for messages."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


@dataclass(frozen=True)
class RedisWait:
    """How long a call waits for an unreachable Redis before failing the request.

    url: the server, as shown in the error (already without a password).
    wait_s: the deadline for the whole call, retries included.
    first_backoff_s / max_backoff_s: the pause after the first failed attempt, doubling up to the max.
    min_attempt_s: the least time the last attempt gets, so a call never starts with no time at all."""

    url: str
    wait_s: float = 5.0
    first_backoff_s: float = 0.05
    max_backoff_s: float = 0.5
    min_attempt_s: float = 0.25

    def __post_init__(self) -> None:
        if not self.wait_s >= 0:
            raise ValueError(f"the Redis wait must be >= 0 seconds, got {self.wait_s}")

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """await attempt() until it succeeds; on a connection error retry with backoff until
        wait_s has passed, then raise UnavailableError. Other errors propagate at once.
        `attempt` must be safe to repeat (each try may or may not have reached Redis)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        backoff = self.first_backoff_s
        while True:
            budget = max(deadline - loop.time(), self.min_attempt_s)
            try:
                return await _shielded(attempt(), budget)
            except RETRYABLE_ERRORS as exc:
                error = exc
            left = deadline - loop.time()
            if left <= 0:
                raise UnavailableError(f"Redis at {self.url} unreachable for {self.wait_s:.1f} s: "
                                       f"{_describe(error)}") from error
            await asyncio.sleep(min(backoff, left))
            backoff = min(2 * backoff, self.max_backoff_s)


_DETACHED: set[asyncio.Task] = set()  # attempts their caller left (cancelled or timed out), still finishing


async def _shielded(command: Awaitable[T], timeout_s: float) -> T:
    """await `command` in its own task for at most timeout_s (then TimeoutError, and the task is
    cancelled); a cancelled caller raises CancelledError at once, and the command is left to
    finish (cancelling redis-py mid-command costs the connection, and may be swallowed anyway)."""
    task = asyncio.ensure_future(command)
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(task)
    except BaseException as exc:
        if not task.done():
            if isinstance(exc, TimeoutError):
                task.cancel()
            _DETACHED.add(task)  # kept until it really ends
            task.add_done_callback(_forget)
        raise


def _forget(task: asyncio.Task) -> None:
    _DETACHED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a detached attempt's failure is nobody's to report


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError) and not str(error):
        return "no answer in time"
    return str(error) or type(error).__name__
