"""Load-aware choice of workers from the registry.

Heartbeats lag, so the router adds what it has itself dispatched since (its in-flight counts)
to the load each worker last reported: a burst of requests spreads instead of piling on the
worker that looked idlest a second ago.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pdserve.runtime.errors import UnavailableError
from pdserve.state.registry import WorkerInfo


@dataclass
class InFlight:
    """What this router has sent to each worker and not yet seen finish."""

    requests: Counter = field(default_factory=Counter)
    prompt_tokens: Counter = field(default_factory=Counter)

    def add(self, worker_id: str, prompt_tokens: int) -> None:
        """Count a dispatched request (and its prompt tokens) against the worker."""
        self.requests[worker_id] += 1
        self.prompt_tokens[worker_id] += prompt_tokens

    def done(self, worker_id: str, prompt_tokens: int) -> None:
        """The request left the worker."""
        self.requests[worker_id] -= 1
        self.prompt_tokens[worker_id] -= prompt_tokens


def choose_prefill(workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
    """The prefill worker with the fewest queued prompt tokens (reported + dispatched)."""
    if not workers:
        raise UnavailableError("no prefill server is registered")
    return min(workers, key=lambda w: (w.load.queued_prompt_tokens + inflight.prompt_tokens[w.worker_id],
                                       inflight.requests[w.worker_id], w.worker_id))


def choose_decode(workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
    """The decode worker with the fewest running sequences (this router's in-flight count
    when it knows more), then the most free KV blocks."""
    if not workers:
        raise UnavailableError("no decode server is registered")
    return min(workers, key=lambda w: (max(w.load.running, inflight.requests[w.worker_id]),
                                       -w.load.free_blocks, w.worker_id))
