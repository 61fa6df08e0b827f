"""Load-aware (and, for prefill, cache-aware) choice of workers from the registry.

Heartbeats lag, so the router adds what it has itself dispatched since (its in-flight counts)
to the load each worker last reported: a burst of requests spreads instead of piling on the
worker that looked idlest a second ago.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pdserve.runtime.errors import UnavailableError
from pdserve.state.kv_events import PrefixIndex
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


def choose_prefill_by_cache(workers: list[WorkerInfo], inflight: InFlight, prompt_ids: list[int],
                            index: PrefixIndex) -> WorkerInfo:
    """The prefill worker with the least work to do for this prompt: the prompt tokens its prefix
    cache does not hold (per the index) plus the prompt tokens queued there (reported + dispatched).
    A hot prefix cannot pile every request onto one worker: its queue counts as much as the tokens
    the cache saves, so once it is busier by more than that, another worker wins."""
    if not workers:
        raise UnavailableError("no prefill server is registered")
    n_prompt = len(prompt_ids)
    keys: dict[int, list[int]] = {}  # the prompt's block keys, hashed once for all the workers

    def work(w: WorkerInfo) -> tuple[int, int, str]:
        to_compute = n_prompt - min(index.cached_tokens(w.worker_id, prompt_ids, keys), n_prompt - 1)
        queued = w.load.queued_prompt_tokens + inflight.prompt_tokens[w.worker_id]
        return to_compute + queued, inflight.requests[w.worker_id], w.worker_id

    return min(workers, key=work)


def choose_decode(workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
    """The decode worker with the fewest running sequences (this router's in-flight count
    when it knows more), then the most free KV blocks."""
    if not workers:
        raise UnavailableError("no decode server is registered")
    return min(workers, key=lambda w: (max(w.load.running, inflight.requests[w.worker_id]),
                                       -w.load.free_blocks, w.worker_id))
