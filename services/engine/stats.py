"""Engine accounting that a router and the metrics exporter read."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineCounters:
    """Running totals the engine updates every step (monotonic)."""

    num_steps: int = 0
    num_prefill_tokens_computed: int = 0  # prompt tokens (and recomputed tokens) run through the model
    num_decode_tokens_computed: int = 0  # single last-sampled tokens run through the model
    num_cache_hit_tokens: int = 0  # tokens served from the prefix cache at admission
    num_cache_query_tokens: int = 0  # tokens looked up in the prefix cache at admission
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_finished_requests: int = 0
    num_aborted_requests: int = 0
    num_interrupted_steps: int = 0  # steps abandoned after a layer: every request in them was aborted
    num_dropped_chunks: int = 0  # chunks that left a step after a layer, their request being aborted
    num_speculative_chunks: int = 0  # decode chunks that carried speculative proposals
    num_speculative_proposed_tokens: int = 0
    num_speculative_accepted_tokens: int = 0
    # speculative_accepted_by_position[i]: chunks whose proposal i was accepted (i = 0 first)
    speculative_accepted_by_position: list[int] = field(default_factory=list)

    @property
    def speculative_acceptance_rate(self) -> float:
        """Accepted / proposed speculative tokens (0 before any proposal)."""
        proposed = self.num_speculative_proposed_tokens
        return self.num_speculative_accepted_tokens / proposed if proposed else 0.0

    @property
    def mean_speculative_accepted_length(self) -> float:
        """Proposals accepted per speculative chunk (each chunk also yields one drawn token)."""
        chunks = self.num_speculative_chunks
        return self.num_speculative_accepted_tokens / chunks if chunks else 0.0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: KV blocks, queues and the running totals.

    num_blocks_cached counts blocks holding a prefix-cache entry, in use or free;
    num_blocks_free counts blocks with no owner (cached ones included: they are evictable);
    num_waiting_requests counts queued requests, prefilled ones waiting for a slot included;
    num_prompt_tokens_to_compute: prompt tokens that waiting and running requests have yet to
    compute (what their prefix-cache hits and earlier chunks did not cover);
    num_reservations / num_blocks_reserved: decode-side reservations whose KV has not been
    handed to a request yet, and the blocks they hold (not counted in num_blocks_free).
    """

    num_blocks_total: int
    num_blocks_free: int
    num_blocks_cached: int
    num_running_requests: int
    num_running_seqs: int
    num_waiting_requests: int
    num_waiting_prompt_tokens: int
    counters: EngineCounters
    num_prompt_tokens_to_compute: int = 0
    num_reservations: int = 0
    num_blocks_reserved: int = 0

    @property
    def num_blocks_used(self) -> int:
        """Blocks owned by at least one sequence."""
        return self.num_blocks_total - self.num_blocks_free

    @property
    def num_computed_tokens(self) -> int:
        """All tokens run through the model."""
        return self.counters.num_prefill_tokens_computed + self.counters.num_decode_tokens_computed

    @property
    def num_preemptions(self) -> int:
        """Requests preempted so far."""
        return self.counters.num_preemptions

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up tokens served from the prefix cache (0 before any lookup)."""
        queried = self.counters.num_cache_query_tokens
        return self.counters.num_cache_hit_tokens / queried if queried else 0.0
