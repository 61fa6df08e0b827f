"""A worker's bound on the requests it holds without running them yet (--max-queued-requests).

A request beyond the bound is refused at once with OverloadedError -> RESOURCE_EXHAUSTED and a
retry hint (the router then tries another worker), instead of queueing without limit:

    bound = QueueBound(256, "prefill queue", retry_after_ms=1000)
    with bound.hold():                        # counts this call while it waits/computes
        ...
    bound.check(len(reservations) + stats.num_waiting_requests)   # a count kept elsewhere
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pdserve.runtime.errors import OverloadedError
from pdserve.runtime.retry_hint import DEFAULT_RETRY_AFTER_MS

DEFAULT_MAX_QUEUED_REQUESTS = 256


class QueueBound:
    """At most `limit` requests queued on this worker; `what` names the queue in the message.
    Used from the event loop only (hold() and check() do not await)."""

    def __init__(self, limit: int = DEFAULT_MAX_QUEUED_REQUESTS, what: str = "queue",
                 retry_after_ms: int = DEFAULT_RETRY_AFTER_MS) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"--max-queued-requests must be an int >= 1, got {limit!r}")
        if isinstance(retry_after_ms, bool) or not isinstance(retry_after_ms, int) or retry_after_ms < 0:
            raise ValueError(f"--overload-retry-after-ms must be an int >= 0, got {retry_after_ms!r}")
        self.limit = limit
        self.what = what
        self.retry_after_ms = retry_after_ms
        self.held = 0  # calls inside hold()
        self.num_rejected = 0

    def check(self, queued: int) -> None:
        """Raise OverloadedError when `queued` requests (not counting the new one) fill the bound."""
        if queued >= self.limit:
            self.num_rejected += 1
            raise OverloadedError(
                f"the {self.what} is full ({queued} requests, --max-queued-requests {self.limit}); "
                f"retry after {self.retry_after_ms} ms", retry_after_ms=self.retry_after_ms)

    @contextlib.contextmanager
    def hold(self, others: int = 0) -> Iterator[None]:
        """Count the enclosed call as queued; refuse it (OverloadedError) when the calls already
        held plus `others` fill the bound."""
        self.check(self.held + others)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    def add_hint(self, error: BaseException) -> None:
        """Give an OverloadedError raised without a retry hint (the engine's, when KV blocks
        are short) this bound's hint."""
        if isinstance(error, OverloadedError) and error.retry_after_ms is None:
            error.retry_after_ms = self.retry_after_ms
