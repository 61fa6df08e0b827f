"""Router admission control: a bounded number of Generate calls in flight.

A call beyond the bound is refused at once (before tokenizing, Redis or any worker) with
OverloadedError -> RESOURCE_EXHAUSTED and a retry hint, so a burst far above capacity costs
the router a counter check per refused call, and the accepted calls keep their latency.

    admission = AdmissionControl(AdmissionLimits(max_inflight_requests=256))
    with admission.admit():        # OverloadedError when 256 calls are already in flight
        ...                        # serve the call; the slot is freed on leaving, however it ends
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pdserve.runtime.errors import OverloadedError
from pdserve.runtime.retry_hint import DEFAULT_RETRY_AFTER_MS

DEFAULT_MAX_INFLIGHT_REQUESTS = 256


@dataclass(frozen=True)
class AdmissionLimits:
    """The router's bound: max_inflight_requests Generate calls at once (each call counts once,
    whatever its n), and retry_after_ms, the delay refused clients are told to wait."""

    max_inflight_requests: int = DEFAULT_MAX_INFLIGHT_REQUESTS
    retry_after_ms: int = DEFAULT_RETRY_AFTER_MS

    def __post_init__(self) -> None:
        if isinstance(self.max_inflight_requests, bool) or not isinstance(self.max_inflight_requests, int) \
                or self.max_inflight_requests < 1:
            raise ValueError(f"max_inflight_requests must be an int >= 1, got {self.max_inflight_requests!r}")
        if isinstance(self.retry_after_ms, bool) or not isinstance(self.retry_after_ms, int) \
                or self.retry_after_ms < 0:
            raise ValueError(f"retry_after_ms must be an int >= 0, got {self.retry_after_ms!r}")


class AdmissionControl:
    """Counts the router's calls in flight and refuses new ones beyond the limit. Used from
    the event loop only (no lock: admit() does not await)."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.in_flight = 0
        self.num_admitted = 0  # totals since start, for logs and tests
        self.num_rejected = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the enclosed call. Raises OverloadedError (with the retry hint)
        when every slot is taken."""
        limit = self.limits.max_inflight_requests
        if self.in_flight >= limit:
            self.num_rejected += 1
            raise OverloadedError(
                f"the router is at capacity ({limit} requests in flight, --max-inflight-requests); "
                f"retry after {self.limits.retry_after_ms} ms", retry_after_ms=self.limits.retry_after_ms)
        self.in_flight += 1
        self.num_admitted += 1
        try:
            yield
        finally:
            self.in_flight -= 1
