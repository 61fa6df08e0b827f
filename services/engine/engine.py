"""LLMEngine: the synchronous continuous-batching engine (schedule -> run -> sample -> stop)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.chunk_info import LayerHook, chunk_infos
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_runner import ScheduledChunk
from pdserve.engine.outputs import GenerationResult, RequestOutput, SampleOutput
from pdserve.engine.prefilled import attach_prompt_kv, check_progress, prime_samples
from pdserve.engine.prompt_logprobs import PromptLogprobs, prompt_rows, score_prompt_rows
from pdserve.engine.request import Request, Sample
from pdserve.engine.reservations import BlockReservation, ReservationBook
from pdserve.engine.sample_processor import SampleProcessor, SamplingTarget, Verification, make_stop_checker
from pdserve.engine.scheduler import ScheduledSample, Scheduler, SchedulerOutput
from pdserve.engine.speculation import NgramProposer, Proposer
from pdserve.engine.stats import EngineCounters, EngineStats
from pdserve.engine.validation import RequestRejectedError, validate_request
from pdserve.models.grammar import GrammarError, compiler_for
from pdserve.models.sampler import Sampler
from pdserve.models.sampling_params import SamplingParams


class StepInterrupted(Exception):
    """Raised after a layer to abandon the rest of a step whose requests are all being aborted."""


class LLMEngine:
    """Continuous batching over one ModelRunner.

    runner: has block_size, num_blocks, execute(chunks) -> logits [N, V], copy_blocks(pairs);
    tokenizer: has eos_token_ids (and decode, for the incremental detokenizer), or None for an
    engine that returns token ids only (no text, no stop strings, no EOS); draft_runner: the draft
    model's ModelRunner when config.speculative.method is "draft" (pdserve.engine.draft_proposer).
    Not thread-safe: one thread calls every method (AsyncEngine arranges that).

    Disaggregation: a decode server reserve()s blocks for a prompt whose KV another server
    sends, then add_prefilled_request()s the request onto them; a prefill server passes a
    layer_hook to step() to stream each layer's KV while the next one computes.
    """

    def __init__(self, runner: Any, tokenizer: Any, config: EngineConfig, draft_runner: Any = None) -> None:
        if config.block_size != runner.block_size:
            raise ValueError(f"EngineConfig.block_size {config.block_size} differs from the "
                             f"runner's KV cache block size {runner.block_size}")
        num_blocks = config.num_blocks or runner.num_blocks
        if num_blocks > runner.num_blocks:
            raise ValueError(f"EngineConfig.num_blocks {num_blocks} exceeds the runner's KV cache "
                             f"({runner.num_blocks} blocks)")
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.num_blocks = num_blocks
        model_config = getattr(runner, "config", None)
        self.vocab_size: int | None = getattr(model_config, "vocab_size", None)
        self.max_model_len = config.max_model_len or getattr(
            model_config, "max_position_embeddings", num_blocks * config.block_size)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self.sampler = Sampler(self.eos_token_ids)
        self.grammars = compiler_for(tokenizer, self.vocab_size)
        self.pool = BlockPool(num_blocks, enable_caching=config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.scheduler = Scheduler(config, self.kv)
        self.reservations = ReservationBook(self.pool, config.block_size, self.max_model_len)
        self.processor = SampleProcessor(self.sampler, self.grammars)
        self.proposer = self._make_proposer(draft_runner)
        self.counters = EngineCounters()
        self.requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._generate_calls = itertools.count()

    def _make_proposer(self, draft_runner: Any) -> Proposer | None:
        speculative = self.config.speculative
        if (draft_runner is not None) != (speculative is not None and speculative.method == "draft"):
            raise ValueError("a draft runner is needed with speculative method 'draft', and only then")
        if speculative is None:
            return None
        if speculative.method == "ngram":
            return NgramProposer(speculative)
        from pdserve.engine.draft_proposer import DraftProposer, check_draft_runner

        check_draft_runner(draft_runner, self.num_blocks, self.config.block_size, self.max_model_len)
        return DraftProposer(draft_runner, self.sampler, self.vocab_size or draft_runner.config.vocab_size,
                             self.config.max_num_batched_tokens)

    def validate_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestRejectedError (a ValueError) if the request can never be served."""
        validate_request(
            prompt_token_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs, num_blocks=self.num_blocks,
            block_size=self.config.block_size, can_detokenize=self.tokenizer is not None)
        if params.structured is not None and self.grammars is None:
            raise RequestRejectedError("structured output needs the model's tokenizer, and this engine has none")

    def prepare_constraint(self, params: SamplingParams) -> None:
        """Compile the request's structured-output constraint, if any (cached: later requests with the same
        one, and the engine's own use of it, find it compiled); RequestRejectedError when it does not compile.
        Thread-safe: AsyncEngine runs it on a worker thread before the request reaches the engine's."""
        if params.structured is None or self.grammars is None:
            return
        try:
            self.grammars.check(params.structured)
        except GrammarError as exc:
            raise RequestRejectedError(f"structured output ({params.structured.kind}): {exc}") from exc

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request. ValueError on a duplicate id, an empty prompt, or one that cannot fit."""
        self._check_new_request(request_id, prompt_token_ids, params)
        request = self._new_request(request_id, prompt_token_ids, params, range(params.n))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = PromptLogprobs(list(request.prompt_token_ids))
        if not request.scores_prompt:  # (a scored prompt is computed whole)
            held = self.kv.find_cached_tokens(request.prompt_token_ids)
            # The router balances on the rest; the last prompt token is always computed (its logits are needed).
            request.num_expected_cached_tokens = min(len(held.blocks) * self.kv.block_size,
                                                     len(prompt_token_ids) - 1)
        self.requests[request_id] = request
        self.scheduler.add(request)

    def _check_new_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise RequestRejectedError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise RequestRejectedError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, params)
        self.prepare_constraint(params)

    def _new_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                     sample_indices: Sequence[int]) -> Request:
        prompt = [int(t) for t in prompt_token_ids]
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        samples = [Sample(next(self._seq_ids), i, prompt) for i in sample_indices]
        for sample in samples:
            sample.stop_checker = make_stop_checker(self.tokenizer, prompt, params, self.eos_token_ids)
            if params.structured is not None:
                sample.grammar = self.grammars.matcher(params.structured)
        return Request(request_id, prompt, params, seed, next(self._arrivals), samples)

    def reserve(self, reservation_id: str, num_prompt_tokens: int, expires_at: float | None = None) -> list[int]:
        """Hold blocks for a prompt's KV (sent by a prefill server); returns their ids in logical
        order. OverloadedError when too few blocks are free (see ReservationBook.reserve for the
        other errors). With expires_at, expire_reservations(now) frees it once now >= expires_at."""
        return self.reservations.reserve(reservation_id, num_prompt_tokens, expires_at).block_ids

    def reserve_prompt(self, reservation_id: str, prompt_token_ids: Sequence[int],
                       expires_at: float | None = None) -> BlockReservation:
        """reserve() for a prompt whose tokens are known: the leading full blocks of it that the
        prefix cache holds are pinned and lead the reservation (held_blocks), so only the blocks
        after them need KV from the prefill server. An empty prefix cache makes it reserve()."""
        prompt = tuple(int(t) for t in prompt_token_ids)
        held = self.kv.find_cached_tokens(prompt)
        return self.reservations.reserve(reservation_id, len(prompt), expires_at, held,
                                         prompt[:len(held.blocks) * self.config.block_size])

    def release_reservation(self, reservation_id: str) -> bool:
        """Free an open reservation's blocks; False when it is not open (idempotent)."""
        return self.reservations.release(reservation_id)

    def extend_reservation(self, reservation_id: str, expires_at: float) -> bool:
        """Move an open reservation's expiry (a lease renewed while its KV is on the way); False
        when it is not open."""
        return self.reservations.extend(reservation_id, expires_at)

    def expire_reservations(self, now: float) -> list[str]:
        """Release the reservations whose expires_at <= now (same clock); returns their ids."""
        return self.reservations.expire(now)

    def add_prefilled_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                              generated: Sequence[Sequence[int]], sample_indices: Sequence[int] | None = None,
                              reservation_id: str | None = None, cached_tokens: int = 0) -> None:
        """Continue a request another server started; its samples join the running batch.

        generated[k]: the tokens sample sample_indices[k] (default k) already produced (finished
        samples are left out). With reservation_id, the reservation's blocks hold the prompt's
        KV and every sample has its first token; the reservation is consumed by this call
        whatever happens (its blocks pass to the request, or are freed if the call raises).
        Without, prompt + generated tokens are recomputed here. cached_tokens is echoed in the
        outputs. Raises NotFoundError (reservation not open) or RequestRejectedError.
        """
        reservation = self.reservations.take(reservation_id) if reservation_id is not None else None
        try:
            self._check_new_request(request_id, prompt_token_ids, params)
            indices = check_progress(prompt_token_ids, params, generated, sample_indices,
                                     cached_tokens, self.vocab_size, reservation)
            request = self._new_request(request_id, prompt_token_ids, params, indices)
            finished = prime_samples(request, generated)
        except BaseException:
            if reservation is not None:
                self.reservations.free(reservation)
            raise
        request.num_cached_tokens = int(cached_tokens)
        if finished:
            self._pending_outputs.append(RequestOutput(request_id, finished, request.num_prompt_tokens,
                                                       request.num_cached_tokens, request.is_finished))
        if request.is_finished:
            if reservation is not None:
                self.reservations.free(reservation)
            self.counters.num_finished_requests += 1
            return
        self.requests[request_id] = request
        if reservation is None:
            self.scheduler.add(request)
        else:
            attach_prompt_kv(self.kv, request, reservation.blocks)
            self.scheduler.add_ready(request)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is unknown or done.
        Its final output (finish_reason "abort") comes from the next step()."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.remove(request)
        self.counters.num_aborted_requests += 1
        aborted = [SampleOutput(s.sample_index, text=s.pending_text, finish_reason="abort")
                   for s in request.live_samples]
        for sample in request.live_samples:
            sample.finish_reason = "abort"
        self._pending_outputs.append(RequestOutput(
            request_id, aborted, request.num_prompt_tokens, request.num_cached_tokens or 0, True, None,
            request.num_speculative_proposed_tokens, request.num_speculative_accepted_tokens))
        return True

    def has_unfinished_requests(self) -> bool:
        """True while a request is queued or running, or an abort output is not yet returned."""
        return bool(self.requests) or bool(self._pending_outputs)

    def step(self, layer_hook: LayerHook | None = None,
             aborting: Callable[[set[str]], set[str]] | None = None) -> list[RequestOutput]:
        """Run one iteration: schedule, copy shared blocks, run the model, sample, apply stops.

        Returns one RequestOutput per request that progressed or finished in this step.
        layer_hook(i, infos), if given, runs once layer i has written the K/V of the step's
        chunks still computing (infos: list[ChunkInfo]); it must not raise. aborting(request_ids),
        if given, runs after every layer of a step with prompt chunks, with the ids of the
        requests still computing, and returns those of them whose caller has an abort to apply.
        Their chunks leave the step there: the later layers do not compute them, and the step
        keeps nothing of them (no token, no computed token counted, no prefix-cache entry). When
        every request leaves, the rest of the step is abandoned. A long prefill step stops
        computing a prompt whose client left within a layer, whoever it shares the step with.
        """
        outputs, self._pending_outputs = self._pending_outputs, []
        speculate = (self.proposer is not None
                     and self.scheduler.num_batch_seqs <= self.config.speculative.max_batch_seqs)
        self.scheduler.propose = self._propose if speculate else None
        sched = self.scheduler.schedule()
        self.counters.num_preemptions = self.scheduler.num_preemptions
        if not sched.scheduled:
            return outputs
        self.counters.num_steps += 1
        self.runner.copy_blocks(sched.copy_pairs)
        if speculate:
            self.proposer.complete(sched.scheduled)
        if aborting is not None and not any(s.num_sample_tokens > 1 for s in sched.scheduled):
            aborting = None  # a decode-only step is short (and keeps its CUDA graphs)
        infos = chunk_infos(sched.scheduled, self.config.block_size) if layer_hook is not None else None
        # The requests that have not left the step (built only for a step that may be left).
        computing = {s.request.request_id for s in sched.scheduled} if aborting is not None else set()

        def layer_done(i: int) -> set[int] | None:
            nonlocal infos
            if layer_hook is not None:
                layer_hook(i, infos)
            if aborting is None:
                return None
            leaving = aborting(computing)
            if not leaving:
                return None
            if leaving >= computing:
                raise StepInterrupted
            computing.difference_update(leaving)
            if infos is not None:
                infos = [info for info in infos if info.request_id not in leaving]
            return {j for j, s in enumerate(sched.scheduled) if s.request.request_id in leaving}

        scored = [self._prompt_rows(s) for s in sched.scheduled]
        try:
            logits = self.runner.execute([self._chunk(s, rows) for s, rows in zip(sched.scheduled, scored)],
                                         layer_done=layer_done if layer_hook or aborting else None)
        except StepInterrupted:
            self.counters.num_interrupted_steps += 1
            self.counters.num_dropped_chunks += len(sched.scheduled)
            return outputs
        kept = sched.scheduled if aborting is None else [s for s in sched.scheduled
                                                         if s.request.request_id in computing]
        self.counters.num_dropped_chunks += len(sched.scheduled) - len(kept)
        if any(scored):
            rows_of = dict(zip(map(id, sched.scheduled), scored))
            logits = self._score_prompts(logits, [(s, rows_of[id(s)]) for s in kept])
        self._advance(sched, kept)
        targets = [self._sampling_target(s) for s in kept if s.needs_logits]
        deltas, verifications = self.processor.sample(logits, targets)
        self.counters.num_generated_tokens += sum(len(delta.token_ids) for _, _, delta in deltas)
        self._settle_speculation(verifications)
        outputs.extend(self._collect_outputs(deltas))
        return outputs

    def _propose(self, request: Request, sample: Sample, max_tokens: int) -> list[int]:
        """Speculative proposals for a sample about to decode one token (the scheduler asks): at most
        num_speculative_tokens, max_tokens (the step's budget left), and what its max_tokens and the
        model length leave after the token the step draws anyway, and what the sample's pace allows."""
        if not request.params.speculative or request.params.structured is not None:
            return []
        limit = min(sample.speculation_pace.limit(self.config.speculative.num_speculative_tokens), max_tokens,
                    request.params.max_tokens - len(sample.output_token_ids) - 1,
                    self.max_model_len - sample.num_tokens - 1)
        if limit <= 0:
            return []
        return self.proposer.propose(sample, limit)

    def _settle_speculation(self, verifications: list[Verification]) -> None:
        """The accepted proposals' KV is the sample's now; blocks taken only for rejected ones go back."""
        c = self.counters
        for v in verifications:
            c.num_speculative_chunks += 1
            c.num_speculative_proposed_tokens += v.num_proposed
            c.num_speculative_accepted_tokens += v.num_accepted
            c.num_decode_tokens_computed += v.num_proposed  # run through the model, accepted or not
            v.request.num_speculative_proposed_tokens += v.num_proposed
            v.request.num_speculative_accepted_tokens += v.num_accepted
            by_position = c.speculative_accepted_by_position
            by_position.extend([0] * (v.num_proposed - len(by_position)))
            for i in range(v.num_accepted):
                by_position[i] += 1
            sample = v.sample
            if sample.is_finished:  # its blocks are freed with it
                continue
            sample.speculation_pace.record(v.num_proposed, v.num_accepted, self.config.speculative.num_speculative_tokens)
            sample.num_computed_tokens += v.num_accepted
            # A draft model's KV stays valid up to the first token it was not shown (see draft_proposer).
            sample.num_draft_tokens = min(sample.num_draft_tokens, sample.num_tokens - 1)
            self.kv.trim(sample, sample.num_tokens)
            self.kv.cache_full_blocks(sample)

    def _chunk(self, s: ScheduledSample, num_prompt_rows: int) -> ScheduledChunk:
        """The runner's chunk: logits rows for its sampling (1 + proposals) after its num_prompt_rows
        prompt positions to score."""
        sample = s.sample
        return ScheduledChunk(
            seq_id=sample.seq_id,
            token_ids=sample.token_slice(s.start, s.start + s.num_sample_tokens) + s.proposed_token_ids,
            start_position=s.start,
            block_table=[b.block_id for b in sample.block_table],
            needs_logits=s.needs_logits or num_prompt_rows > 0,
            num_logits=num_prompt_rows + (1 + len(s.proposed_token_ids) if s.needs_logits else 0),
        )

    @staticmethod
    def _prompt_rows(s: ScheduledSample) -> int:
        """Prompt positions this chunk scores (pdserve.engine.prompt_logprobs)."""
        request = s.request
        return prompt_rows(request.prompt_logprobs, request.num_prompt_tokens, s.start, s.start + s.num_sample_tokens)

    @staticmethod
    def _score_prompts(logits: Any, chunks: list[tuple[ScheduledSample, int]]) -> Any:
        """Score the prompt rows of the step's logits (chunks: the computed chunks, each with its number
        of prompt rows, in step order); returns the sampling rows alone."""
        sampling_rows: list[int] = []
        row = 0
        for s, num_prompt_rows in chunks:
            if num_prompt_rows:
                request = s.request
                score_prompt_rows(request.prompt_logprobs, logits[row:row + num_prompt_rows],
                                  request.params.prompt_logprobs or 0)
                row += num_prompt_rows
            if s.needs_logits:
                num_sampling = 1 + len(s.proposed_token_ids)
                sampling_rows.extend(range(row, row + num_sampling))
                row += num_sampling
        return logits[sampling_rows]

    def _advance(self, sched: SchedulerOutput, computed: Sequence[ScheduledSample]) -> None:
        """Mark the computed chunks' tokens, register full blocks, fork finished shared prompts."""
        c = self.counters
        c.num_cache_hit_tokens += sched.num_cache_hit_tokens
        c.num_cache_query_tokens += sched.num_cache_query_tokens
        for s in computed:
            sample = s.sample
            # A decode feeds back just the last sampled token; anything else is (re)computed prompt.
            # Speculative proposals are counted once verified (_settle_speculation), not here.
            if s.num_sample_tokens == 1 and sample.output_token_ids and s.start == sample.num_tokens - 1:
                c.num_decode_tokens_computed += 1
            else:
                c.num_prefill_tokens_computed += s.num_sample_tokens
            sample.num_computed_tokens += s.num_sample_tokens
            self.kv.cache_full_blocks(sample)
            if s.fork:
                self.kv.fork(sample, [x for x in s.request.live_samples if x is not sample])
                s.request.forked = True

    def _sampling_target(self, s: ScheduledSample) -> SamplingTarget:
        """The samples that draw from this chunk's logits row (all live ones at a fork), or the one
        sample that verifies the chunk's proposals."""
        return SamplingTarget(s.request, s.request.live_samples if s.fork else [s.sample], s.proposed_token_ids)

    def _collect_outputs(self, deltas: list[tuple[Request, Sample, SampleOutput]]) -> list[RequestOutput]:
        """Group sample deltas per request; release finished samples and requests."""
        by_request: dict[str, RequestOutput] = {}
        for request, sample, delta in deltas:
            out = by_request.get(request.request_id)
            if out is None:
                out = RequestOutput(request.request_id, [], request.num_prompt_tokens,
                                    request.num_cached_tokens or 0, False, request.queue_time_s,
                                    request.num_speculative_proposed_tokens, request.num_speculative_accepted_tokens)
                by_request[request.request_id] = out
            out.samples.append(delta)
            if request.prompt_logprobs is not None and not request.scores_prompt:
                out.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None  # sent once, not kept
            if sample.is_finished:
                self.scheduler.free_sample(sample)
        for request_id, out in by_request.items():
            request = self.requests[request_id]
            if request.is_finished:
                out.finished = True
                self.scheduler.remove(request)
                del self.requests[request_id]
                self.counters.num_finished_requests += 1
        return list(by_request.values())

    def stats(self) -> EngineStats:
        """A snapshot of blocks, queues and counters."""
        sched = self.scheduler
        return EngineStats(
            num_blocks_total=self.num_blocks,
            num_blocks_free=self.pool.num_free_blocks,
            num_blocks_cached=self.pool.num_cached_blocks,
            num_running_requests=len(sched.running),
            num_running_seqs=sched.num_running_seqs,
            num_waiting_requests=len(sched.waiting) + len(sched.ready),
            num_waiting_prompt_tokens=sum(r.num_prompt_tokens for r in sched.waiting),
            num_prompt_tokens_to_compute=sched.num_prompt_tokens_to_compute,
            counters=EngineCounters(**{**vars(self.counters), "speculative_accepted_by_position":
                                       list(self.counters.speculative_accepted_by_position)}),
            num_reservations=len(self.reservations),
            num_blocks_reserved=self.reservations.num_blocks,
        )

    def generate(self, prompts_token_ids: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[GenerationResult]:
        """Run the prompts to completion (the engine must be idle); results in prompt order."""
        if self.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine; step() the running requests first")
        if isinstance(params, SamplingParams):
            params_list = [params] * len(prompts_token_ids)
        else:
            params_list = list(params)
        if len(params_list) != len(prompts_token_ids):
            raise ValueError(f"{len(prompts_token_ids)} prompts but {len(params_list)} SamplingParams")
        call = next(self._generate_calls)
        results: dict[str, GenerationResult] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts_token_ids, params_list)):
                request_id = f"generate-{call}-{i}"
                self.add_request(request_id, prompt, p)
                results[request_id] = GenerationResult(
                    request_id, list(prompt), [SampleOutput(k) for k in range(p.n)])
        except ValueError:
            for request_id in results:
                self.abort_request(request_id)
            self._pending_outputs.clear()
            raise
        while self.has_unfinished_requests():
            for out in self.step():
                results[out.request_id].add(out)
        return list(results.values())
