"""When the router retries a request elsewhere: which failures are a worker's (retry on another
worker) and which are the request's own (end the stream with that status), bounded attempts with
backoff, and a short memory of workers that just failed so other requests avoid them too."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

from pdserve.runtime.errors import OverloadedError, UnavailableError

Code = grpc.StatusCode
# Codes that say "this worker (or the path to it) failed", not "this request is wrong" or "no
# room now" (RESOURCE_EXHAUSTED: the dispatcher tries the other workers at once instead).
WORKER_FAILURE_CODES = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED, Code.INTERNAL,
                                  Code.UNKNOWN, Code.ABORTED, Code.NOT_FOUND, Code.DATA_LOSS,
                                  Code.FAILED_PRECONDITION})  # a peer with an incompatible KV setup


class WorkerFailedError(UnavailableError):
    """A worker left a request unfinished: its stream stalled past the idle limit, ended early,
    or the worker aborted the request on its own (a shutdown deadline)."""


def is_worker_failure(error: BaseException) -> bool:
    """Whether `error` says the worker (or the path to it) failed, so that the request should
    go on elsewhere; False for the request's own errors and for refusals for lack of room."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in WORKER_FAILURE_CODES
    if isinstance(error, OverloadedError):
        return False
    return isinstance(error, (UnavailableError, ConnectionError, TimeoutError))


@dataclass
class RetryPolicy:
    """Bounded retries: at most max_attempts tries of one request in all, waiting
    backoff_s * 2**k (with +-50% jitter, at most backoff_max_s) before retry k+1."""

    max_attempts: int = 5
    backoff_s: float = 0.05
    backoff_max_s: float = 1.0
    stream_idle_timeout_s: float = 60.0  # a Decode stream silent this long is treated as dead

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def delay_s(self, failures: int) -> float:
        """Seconds to wait before the attempt that follows `failures` failures (>= 1)."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (failures - 1))
        return base * random.uniform(0.5, 1.5)


@dataclass
class SuspectWorkers:
    """Workers that failed a call recently. They stay registered until their heartbeat key
    expires; meanwhile new attempts pick other workers (unless no other is left)."""

    cooldown_s: float = 5.0
    _until: dict[str, float] = field(default_factory=dict)

    def mark(self, worker_id: str) -> None:
        """Suspect worker_id for cooldown_s from now."""
        self._until[worker_id] = time.monotonic() + self.cooldown_s

    def is_suspect(self, worker_id: str) -> bool:
        """Whether worker_id failed within the cooldown."""
        until = self._until.get(worker_id)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._until[worker_id]
            return False
        return True
