"""Waiting for Redis: a call that finds Redis unreachable is retried with short backoff until a
deadline, then fails with UnavailableError (gRPC UNAVAILABLE) naming the server and the error.

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
                return await asyncio.wait_for(attempt(), budget)
            except RETRYABLE_ERRORS as exc:
                error = exc
            left = deadline - loop.time()
            if left <= 0:
                raise UnavailableError(f"Redis at {self.url} unreachable for {self.wait_s:.1f} s: "
                                       f"{_describe(error)}") from error
            await asyncio.sleep(min(backoff, left))
            backoff = min(2 * backoff, self.max_backoff_s)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError) and not str(error):
        return "no answer in time"
    return str(error) or type(error).__name__
