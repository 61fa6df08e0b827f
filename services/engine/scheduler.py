"""Iteration-level scheduler: decides, every step, which tokens of which sequences to compute.

Policy (vLLM v1 style): running requests first, in admission order, each taking what it needs
from the step's token budget (a long prompt is chunked across steps); then waiting requests in
FCFS order while budget, sequence slots and blocks last. Requests that arrive holding their
prompt's KV already (prefilled on another server) wait in a separate ready queue and join the
running batch, ahead of everything waiting, as soon as sequence slots allow. When a running request cannot get the
blocks it needs, the most recently admitted running request is preempted: its blocks are freed,
it goes back to the front of the waiting queue, and later recomputes prompt + generated tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.prompt_logprobs import MAX_SCORED_TOKENS_PER_STEP, prompt_rows
from pdserve.engine.request import Request, RequestStatus, Sample


@dataclass
class ScheduledSample:
    """num_tokens tokens of `sample` computed this step, from position `start`.

    needs_logits: the chunk reaches the end of the sample's tokens, so a token is sampled.
    fork: the chunk completes the shared prompt of a request whose other samples fork from it.
    admitted: the request was admitted this step (start is then its prefix-cache hit length).
    proposed_token_ids: speculative proposals computed after the sample's last token (the chunk's
    last len(proposed_token_ids) tokens; num_tokens counts them); see pdserve.engine.speculation.
    """

    request: Request
    sample: Sample
    start: int
    num_tokens: int
    needs_logits: bool
    fork: bool
    admitted: bool = False
    proposed_token_ids: list[int] = field(default_factory=list)

    @property
    def num_sample_tokens(self) -> int:
        """Tokens of the sample itself in the chunk (the proposals excluded)."""
        return self.num_tokens - len(self.proposed_token_ids)


@dataclass
class SchedulerOutput:
    """One step's work: the chunks to run and the block copies to make before running them."""

    scheduled: list[ScheduledSample] = field(default_factory=list)
    copy_pairs: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_cache_hit_tokens: int = 0  # tokens served from the prefix cache at admissions this step
    num_cache_query_tokens: int = 0  # tokens looked up in the prefix cache at admissions this step

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Holds the waiting queue and the running list and produces a SchedulerOutput per step."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self._scoring_budget = MAX_SCORED_TOKENS_PER_STEP  # prompt tokens scored this step (prompt_logprobs)
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.ready: deque[Request] = deque()  # requests holding their KV, waiting for a slot
        self.num_preemptions = 0
        self._static_batch: set[str] = set()  # request ids of the current static batch
        # Set by the engine for the steps that speculate: (sample, max tokens) -> proposed tokens.
        self.propose: Callable[[Request, Sample, int], list[int]] | None = None

    @property
    def num_running_seqs(self) -> int:
        """Unfinished samples of running requests (what max_num_seqs limits)."""
        return sum(len(r.live_samples) for r in self.running)

    @property
    def num_batch_seqs(self) -> int:
        """Samples this step's batch may hold: the running ones and those queued to join (at most
        max_num_seqs); what decides whether a step speculates. Stops counting at max_num_seqs (a long
        queue is not walked every step)."""
        count, limit = self.num_running_seqs, self.config.max_num_seqs
        for queue in (self.ready, self.waiting):
            for request in queue:
                if count >= limit:
                    return limit
                count += len(request.live_samples)
        return min(count, limit)

    @property
    def num_prompt_tokens_to_compute(self) -> int:
        """Prompt tokens the waiting and running requests still have to compute (what a prefill
        server's queue costs; the router balances on it)."""
        return (sum(r.num_prompt_tokens_to_compute for r in self.waiting)
                + sum(r.num_prompt_tokens_to_compute for r in self.running))

    def add(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_ready(self, request: Request) -> None:
        """Queue a request whose live samples already hold their KV (prefilled elsewhere)."""
        request.status = RequestStatus.READY
        self.ready.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the scheduler (finished or aborted), freeing all its blocks."""
        for sample in request.samples:
            self.kv.free(sample)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status == RequestStatus.READY:
            self.ready.remove(request)
        request.status = RequestStatus.FINISHED
        self._static_batch.discard(request.request_id)

    def free_sample(self, sample: Sample) -> None:
        """Release the blocks of one finished sample while its siblings go on."""
        self.kv.free(sample)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks, allocating (and copying) blocks for them."""
        out = SchedulerOutput()
        self._scoring_budget = MAX_SCORED_TOKENS_PER_STEP
        self._admit_ready()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _admit_ready(self) -> None:
        """Move ready requests into the running batch while sequence slots last. They need no
        blocks to join; if the blocks for their next tokens run short, the running pass
        preempts as for any running request."""
        while self.ready:
            request = self.ready[0]
            if self.num_running_seqs + len(request.live_samples) > self.config.max_num_seqs:
                break
            self.ready.popleft()
            request.status = RequestStatus.RUNNING
            request.mark_scheduled()
            self.running.append(request)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            plan = self._plan(request, budget, reserve=self._samples_after(index))
            copies = self.kv.allocate([(sample, num_new) for sample, num_new, _ in plan])
            if copies is None:  # proposals, this request's and those scheduled before it, never cost a preemption
                dropped = self._drop_proposals(out)
                if dropped or any(proposed for _, _, proposed in plan):
                    plan = [(sample, num_new - len(proposed), []) for sample, num_new, proposed in plan]
                    budget += dropped
                    copies = self.kv.allocate([(sample, num_new) for sample, num_new, _ in plan])
            needs = [(sample, num_new) for sample, num_new, _ in plan]
            while copies is None:
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget
                copies = self.kv.allocate(needs)
            out.copy_pairs.extend(copies)
            budget -= self._record(request, plan, out)
            index += 1
        return budget

    def _drop_proposals(self, out: SchedulerOutput) -> int:
        """Take the proposals out of the chunks scheduled so far this step and give back the blocks taken for them
        (proposals never get a running request preempted; a waiting request may wait a step longer for them);
        returns the tokens dropped."""
        dropped = 0
        for s in out.scheduled:
            if s.proposed_token_ids:
                dropped += len(s.proposed_token_ids)
                s.num_tokens -= len(s.proposed_token_ids)
                s.proposed_token_ids = []
                self.kv.trim(s.sample, s.start + s.num_tokens)
        return dropped

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        self._maybe_open_static_batch()
        deferred: list[Request] = []  # prompts to score, past this step's scoring budget: they keep their places
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if self._static_batch and request.request_id not in self._static_batch:
                break
            if self.num_running_seqs + len(request.live_samples) > self.config.max_num_seqs:
                break
            if request.scores_prompt and self._scoring_budget == 0:
                deferred.append(self.waiting.popleft())
                continue
            lead_sample = request.lead_sample
            target = request.target_length(lead_sample)
            # A hit never covers the last token (its logits must be computed), nor any while the prompt is scored.
            prefix = self.kv.find_cached_prefix(lead_sample, 0 if request.scores_prompt else target - 1)
            num_cached = len(prefix.blocks) * self.kv.block_size
            num_new = min(target - num_cached, budget)
            if request.scores_prompt:
                num_new = self._within_scoring_budget(request, num_cached, num_new)
            if not self.kv.admit(lead_sample, prefix, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.mark_scheduled()
            self.running.append(request)
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            out.num_cache_hit_tokens += num_cached
            out.num_cache_query_tokens += target
            budget -= self._record(request, [(lead_sample, num_new, [])], out, admitted=True)
        self.waiting.extendleft(reversed(deferred))

    def _within_scoring_budget(self, request: Request, start: int, num_new: int) -> int:
        """num_new cut so that the chunk from `start` scores no more prompt positions than this step's scoring
        budget has left (positions already scored, recomputed after a preemption, cost nothing); charges them."""
        scores = request.prompt_logprobs
        first = max(start, scores.num_scored)
        num_new = min(num_new, first + self._scoring_budget - start)
        self._scoring_budget -= prompt_rows(scores, request.num_prompt_tokens, start, start + num_new)
        return num_new

    def _maybe_open_static_batch(self) -> None:
        """Static mode: once the previous batch is done, the next k waiting requests form one."""
        size = self.config.static_batch_size
        if size is None or self._static_batch or self.running:
            return
        self._static_batch = {r.request_id for r in list(self.waiting)[:size]}

    def _samples_after(self, index: int) -> int:
        """Active samples of the running requests after running[index] (each is owed a token of the budget
        before any sample gets speculative proposals)."""
        return sum(len(r.active_samples()) for r in self.running[index + 1:]) if self.propose is not None else 0

    def _plan(self, request: Request, budget: int, reserve: int = 0) -> list[tuple[Sample, int, list[int]]]:
        """(sample, new tokens, proposed tokens among them) for a running request's active samples
        within the budget; a sample decoding one token may add speculative proposals from what the budget
        has left once every active sample still to plan (here and the `reserve` after) has one token."""
        plan = []
        samples = request.active_samples()
        for position, sample in enumerate(samples):
            if budget <= 0:
                break
            num_new = min(request.target_length(sample) - sample.num_computed_tokens, budget)
            if request.scores_prompt:
                num_new = self._within_scoring_budget(request, sample.num_computed_tokens, num_new)
            proposed: list[int] = []
            spare = budget - 1 - reserve - (len(samples) - position - 1)
            if (num_new == 1 and self.propose is not None and spare > 0 and not request.fork_pending
                    and sample.num_computed_tokens == sample.num_tokens - 1):
                proposed = self.propose(request, sample, spare)
                num_new += len(proposed)
            if num_new > 0:
                plan.append((sample, num_new, proposed))
                budget -= num_new
        return plan

    def _record(self, request: Request, plan: Iterable[tuple[Sample, int, list[int]]], out: SchedulerOutput,
                admitted: bool = False) -> int:
        """Append the plan's chunks to the output; returns the tokens they use."""
        used = 0
        for sample, num_new, proposed in plan:
            start = sample.num_computed_tokens
            end = start + num_new - len(proposed)
            fork = request.fork_pending and end == request.num_prompt_tokens
            out.scheduled.append(ScheduledSample(
                request, sample, start, num_new, needs_logits=end == sample.num_tokens, fork=fork,
                admitted=admitted, proposed_token_ids=proposed))
            used += num_new
        return used

    def preempt(self, request: Request) -> None:
        """Free all of a running request's blocks and put it at the front of the waiting queue;
        it later recomputes its prompt and generated tokens."""
        if request.status != RequestStatus.RUNNING:
            raise RuntimeError(f"request {request.request_id} is not running")
        self.running.remove(request)
        for sample in request.samples:
            self.kv.free(sample)
        request.forked = False
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
