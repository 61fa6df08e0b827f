"""Engine gauges and counters, read from the engine's latest snapshot (EngineStats) when
Prometheus scrapes: the engine's step loop does no metrics work at all. Also the router's
prefix-cache index, read the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.engine.stats import EngineStats


class EngineStatsCollector(Collector):
    """Exports an engine's EngineStats: running/waiting requests, KV blocks (total, used, free,
    cached, reserved), KV usage, prefix-cache hits, preemptions, steps and token totals."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def describe(self):
        """Nothing up front: the registry then skips its duplicate check collect()."""
        return []

    def collect(self) -> Iterator:
        """The current values."""
        s = self.stats()
        c = s.counters
        gauges = {
            "num_requests_running": ("Requests in the running batch.", s.num_running_requests),
            "num_requests_waiting": ("Requests queued (prefilled ones waiting for a slot included).",
                                     s.num_waiting_requests),
            "num_sequences_running": ("Samples in the running batch.", s.num_running_seqs),
            "num_waiting_prompt_tokens": ("Prompt tokens of waiting requests.", s.num_waiting_prompt_tokens),
            "num_prompt_tokens_to_compute": ("Prompt tokens that waiting and running requests have yet to compute "
                                             "(prefix-cache hits and computed chunks excluded).",
                                             s.num_prompt_tokens_to_compute),
            "kv_cache_blocks_total": ("KV cache blocks.", s.num_blocks_total),
            "kv_cache_blocks_used": ("KV cache blocks owned by a sequence.", s.num_blocks_used),
            "kv_cache_blocks_free": ("KV cache blocks with no owner (cached ones included).", s.num_blocks_free),
            "kv_cache_blocks_cached": ("KV cache blocks holding a prefix-cache entry.", s.num_blocks_cached),
            "kv_cache_blocks_reserved": ("KV blocks reserved for prompts whose KV is on its way.",
                                         s.num_blocks_reserved),
            "kv_cache_usage_perc": ("Share of KV cache blocks in use (1 = full).",
                                    s.num_blocks_used / s.num_blocks_total if s.num_blocks_total else 0.0),
            "num_kv_reservations": ("Open KV reservations (decode servers).", s.num_reservations),
            "prefix_cache_hit_rate": ("Share of looked-up prompt tokens served from the prefix cache.",
                                      s.prefix_cache_hit_rate),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"pdserve:{name}", doc, value=value)
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", c.num_cache_query_tokens),
            "prefix_cache_hits": ("Prompt tokens served from the prefix cache.", c.num_cache_hit_tokens),
            "num_preemptions": ("Requests preempted (their KV freed, to be recomputed).", c.num_preemptions),
            "engine_steps": ("Engine iterations run.", c.num_steps),
            "prefill_tokens_computed": ("Prompt (and recomputed) tokens run through the model.",
                                        c.num_prefill_tokens_computed),
            "decode_tokens_computed": ("Decode tokens run through the model.", c.num_decode_tokens_computed),
            "engine_generated_tokens": ("Tokens sampled by the engine.", c.num_generated_tokens),
            "engine_requests_finished": ("Requests the engine finished.", c.num_finished_requests),
            "engine_requests_aborted": ("Requests the engine aborted.", c.num_aborted_requests),
            "engine_steps_interrupted": ("Prefill steps stopped after a layer: every request in them was "
                                         "cancelled.", c.num_interrupted_steps),
            "engine_chunks_dropped": ("Chunks whose request was cancelled while a step computed them: the "
                                      "step's later layers skipped them.", c.num_dropped_chunks),
            "speculative_chunks": ("Decode chunks that carried speculative proposals.", c.num_speculative_chunks),
            "speculative_proposed_tokens": ("Speculative tokens proposed.", c.num_speculative_proposed_tokens),
            "speculative_accepted_tokens": ("Speculative tokens accepted (equal to what the model drew).",
                                            c.num_speculative_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"pdserve:{name}", doc, value=value)
        by_position = CounterMetricFamily("pdserve:speculative_accepted_by_position",
                                          "Speculative chunks whose proposal at this position (0 = first) was accepted.",
                                          labels=["position"])
        for position, count in enumerate(c.speculative_accepted_by_position):
            by_position.add_metric([str(position)], count)
        yield by_position


class PrefixIndexCollector(Collector):
    """The router's view of its workers' prefix caches (--routing kv): blocks indexed per worker."""

    def __init__(self, blocks_by_worker: Callable[[], dict[str, int]]):
        self.blocks_by_worker = blocks_by_worker

    def describe(self):
        """Nothing up front: the registry then skips its duplicate check collect()."""
        return []

    def collect(self) -> Iterator:
        """The current values."""
        family = GaugeMetricFamily("pdserve:router_kv_index_blocks",
                                   "Prefix-cache blocks the router knows each worker (prefill, decode, colocated) holds.",
                                   labels=["worker"])
        for worker, blocks in sorted(self.blocks_by_worker().items()):
            family.add_metric([worker], blocks)
        yield family


class NixlCollector(Collector):
    """A prefill or decode server's NIXL state (--kv-transfer nixl|auto): what its agents hold now.
    counts() returns (agents, registrations, READs in flight, remote agents, KV blocks pinned for
    transfers); leak checks read these after traffic stops: one registration per agent, the
    others at 0 (a decode server keeps idle remote agents for a while: it forgets them after
    failed READs or PEER_IDLE_S unused)."""

    def __init__(self, counts: Callable[[], tuple[int, int, int, int, int]]):
        self.counts = counts

    def describe(self):
        """Nothing up front: the registry then skips its duplicate check collect()."""
        return []

    def collect(self) -> Iterator:
        """The current values."""
        agents, registrations, reads, peers, pinned = self.counts()
        for name, value, text in (
                ("pdserve:kv_nixl_agents", agents, "NIXL agents of this server (a decode server's read lanes)."),
                ("pdserve:kv_nixl_registrations", registrations, "Memory registrations of this server's NIXL agents."),
                ("pdserve:kv_nixl_reads_in_flight", reads, "NIXL READs posted and not yet released (decode)."),
                ("pdserve:kv_nixl_remote_agents", peers, "Remote NIXL agents this server knows, per lane (decode)."),
                ("pdserve:kv_nixl_pinned_blocks", pinned, "KV blocks held for NIXL transfers in flight (prefill).")):
            yield GaugeMetricFamily(name, text, value=value)
