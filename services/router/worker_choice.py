"""Load-aware (and, with --routing kv, cache-aware) choice of workers from the registry.

Heartbeats lag, so the router adds what it has itself dispatched since (its in-flight counts)
to the load each worker last reported: a burst of requests spreads instead of piling on the
worker that looked idlest a second ago.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.runtime.errors import UnavailableError
from pdserve.settings import RoutingWeights
from pdserve.state.kv_events import PrefixIndex
from pdserve.state.registry import WorkerInfo


@dataclass
class InFlight:
    """What this router has sent to each worker and not yet seen finish, and how many requests it
    ever sent each (the last tie-break: idle workers take turns instead of the first by id taking all)."""

    requests: Counter = field(default_factory=Counter)
    prompt_tokens: Counter = field(default_factory=Counter)
    sent: Counter = field(default_factory=Counter)

    def add(self, worker_id: str, prompt_tokens: int) -> None:
        """Count a dispatched request (and its prompt tokens) against the worker."""
        self.requests[worker_id] += 1
        self.prompt_tokens[worker_id] += prompt_tokens
        self.sent[worker_id] += 1

    def done(self, worker_id: str, prompt_tokens: int) -> None:
        """The request left the worker."""
        self.requests[worker_id] -= 1
        self.prompt_tokens[worker_id] -= prompt_tokens


def choose_prefill(workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
    """The prefill worker with the fewest queued prompt tokens (as reported, or as this router
    dispatched them when it knows more), then the one sent fewest requests."""
    if not workers:
        raise UnavailableError("no prefill server is registered")
    return min(workers, key=lambda w: (queued_prompt_tokens(w, inflight), inflight.requests[w.worker_id],
                                       inflight.sent[w.worker_id], w.worker_id))


def queued_prompt_tokens(worker: WorkerInfo, inflight: InFlight) -> int:
    """Prompt tokens waiting on a prefill worker: its last heartbeat's count, or this router's own
    in-flight count when that is larger (a heartbeat lags; summing the two would count twice the
    requests both know of)."""
    return max(worker.load.queued_prompt_tokens, inflight.prompt_tokens[worker.worker_id])


@dataclass
class CacheAwareChoice:
    """Chooses one request's workers by what their prefix caches hold (per the router's index)
    against their load, and remembers, for metrics and the trace, what it expected of the chosen
    one and why it won. Each choose method has the (workers, inflight) -> worker shape the attempt
    runner takes. A hot prefix cannot pile every request onto one worker: its load term grows with
    every request sent there, until another worker's total is smaller."""

    index: PrefixIndex
    prompt_ids: list[int]
    weights: RoutingWeights = field(default_factory=RoutingWeights)
    expected_cached_tokens: int = 0  # what the index says the last chosen worker holds of the prompt
    reason: str = ""  # why the last chosen worker won: ROUTE_REASONS
    _keys: dict[int, list[int]] = field(default_factory=dict)  # the prompt's block keys per block size

    def _cached(self, worker: WorkerInfo) -> int:
        return self.index.cached_tokens(worker.worker_id, self.prompt_ids, self._keys)

    def _pick(self, workers: list[WorkerInfo], cost, role: str,
              credit: Callable[[WorkerInfo, int], int] | None = None) -> WorkerInfo:
        """The worker of least cost(worker, credited cached tokens); credit(worker, cached) may take
        back what a worker holds (a saturated one). The reason is judged on the credited amounts:
        "load" when they do not differ (none holds any, or all hold the same, e.g. a system prompt)."""
        if not workers:
            raise UnavailableError(f"no {role} server is registered")
        cached = {w.worker_id: self._cached(w) for w in workers}
        if credit is not None:
            cached = {w.worker_id: credit(w, cached[w.worker_id]) for w in workers}
        best = min(workers, key=lambda w: (cost(w, cached[w.worker_id]), w.worker_id))
        most = max(cached.values())
        self.expected_cached_tokens = cached[best.worker_id]
        if most == min(cached.values()):
            self.reason = "load"
        else:
            self.reason = "cache" if cached[best.worker_id] == most else "load_over_cache"
        return best

    @property
    def tokens_to_compute(self) -> int:
        """The prompt tokens the last chosen worker is expected to compute (what its queue grows by)."""
        return len(self.prompt_ids) - min(self.expected_cached_tokens, len(self.prompt_ids) - 1)

    def prefill(self, workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
        """The prefill server with the least work for this prompt: the prompt tokens its cache does
        not hold, plus prefill_queue_weight times the prompt tokens queued there (reported and
        dispatched since)."""
        n_prompt, weight = len(self.prompt_ids), self.weights.prefill_queue_weight

        def cost(w: WorkerInfo, cached: int) -> tuple[float, int]:
            queued = queued_prompt_tokens(w, inflight)
            return (n_prompt - min(cached, n_prompt - 1) + weight * queued, inflight.requests[w.worker_id],
                    inflight.sent[w.worker_id])

        return self._pick(workers, cost, "prefill")

    def decode(self, workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
        """The decode server where the prompt costs least: the prompt tokens whose KV it would have
        to receive (what its cache holds is not sent), plus decode_running_weight per running
        sequence; a server with under full_kv_fraction of its blocks free gets no cache credit."""
        n_prompt, weight = len(self.prompt_ids), self.weights.decode_running_weight

        def cost(w: WorkerInfo, cached: int) -> tuple[float, int]:
            running = max(w.load.running, inflight.requests[w.worker_id])
            return n_prompt - cached + weight * running, -w.load.free_blocks, inflight.sent[w.worker_id]

        def credit(w: WorkerInfo, cached: int) -> int:
            full = w.load.total_blocks and w.load.free_blocks < self.weights.full_kv_fraction * w.load.total_blocks
            return 0 if full else cached

        return self._pick(workers, cost, "decode", credit)

    def colocated(self, workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
        """The colocated worker where the prompt costs least: the prefill cost (tokens its cache
        does not hold, plus its weighted queue) plus the decode cost of its running sequences."""
        n_prompt, weights = len(self.prompt_ids), self.weights

        def cost(w: WorkerInfo, cached: int) -> tuple[float, int]:
            queued = queued_prompt_tokens(w, inflight)
            running = max(w.load.running, inflight.requests[w.worker_id])
            return (n_prompt - min(cached, n_prompt - 1) + weights.prefill_queue_weight * queued
                    + weights.decode_running_weight * running), -w.load.free_blocks, inflight.sent[w.worker_id]

        return self._pick(workers, cost, "colocated")


# cache: the chosen worker holds the most of the prompt; load: none holds any; load_over_cache: one holding more was busier
ROUTE_REASONS = ("cache", "load", "load_over_cache")


def choose_decode(workers: list[WorkerInfo], inflight: InFlight) -> WorkerInfo:
    """The decode worker with the fewest running sequences (this router's in-flight count
    when it knows more), then the most free KV blocks, then the one sent fewest requests."""
    if not workers:
        raise UnavailableError("no decode server is registered")
    return min(workers, key=lambda w: (max(w.load.running, inflight.requests[w.worker_id]),
                                       -w.load.free_blocks, inflight.sent[w.worker_id], w.worker_id))
