"""Scheduler policy without a model: budgets, chunked prefill, FCFS, preemption, abort, forks."""

from __future__ import annotations

import itertools

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus, Sample
from pdserve.engine.scheduler import Scheduler
from pdserve.models.sampling_params import SamplingParams

BS = 4


class Harness:
    """A scheduler plus the bookkeeping the engine does after running a step (tokens are fake:
    each sampled token is 1000 + the step number)."""

    def __init__(self, num_blocks, **config):
        self.config = EngineConfig(block_size=BS, num_blocks=num_blocks, **config)
        self.pool = BlockPool(num_blocks, enable_caching=self.config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, BS)
        self.scheduler = Scheduler(self.config, self.kv)
        self.ids = itertools.count()
        self.prompts = itertools.count(1)
        self.steps = 0

    def add(self, rid, prompt_len, max_tokens=4, n=1, prompt=None):
        base = 100 * next(self.prompts)  # distinct prompts unless one is given
        prompt = list(prompt) if prompt is not None else [base + i for i in range(prompt_len)]
        params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0.0)
        samples = [Sample(next(self.ids), i, prompt) for i in range(n)]
        request = Request(rid, prompt, params, 0, self.steps, samples)
        self.scheduler.add(request)
        return request

    def step(self):
        out = self.scheduler.schedule()
        self.steps += 1
        for s in out.scheduled:
            s.sample.num_computed_tokens += s.num_tokens
            self.kv.cache_full_blocks(s.sample)
            if s.fork:
                self.kv.fork(s.sample, [x for x in s.request.live_samples if x is not s.sample])
                s.request.forked = True
        finished = []
        for s in out.scheduled:
            if not s.needs_logits:
                continue
            for sample in (s.request.live_samples if s.fork else [s.sample]):
                sample.output_token_ids.append(1000 + self.steps)
                if len(sample.output_token_ids) >= s.request.params.max_tokens:
                    sample.finish_reason = "length"
                    self.scheduler.free_sample(sample)
            if s.request.is_finished and s.request not in finished:
                finished.append(s.request)
        for request in finished:
            self.scheduler.remove(request)
        return out

    def run_to_completion(self, limit=1000):
        for _ in range(limit):
            if not self.scheduler.running and not self.scheduler.waiting:
                return
            self.step()
        raise AssertionError("requests did not finish")


def chunks(out):
    return [(s.request.request_id, s.sample.sample_index, s.start, s.num_tokens, s.needs_logits)
            for s in out.scheduled]


def test_long_prompt_is_chunked_under_the_token_budget():
    h = Harness(32, max_num_batched_tokens=8)
    h.add("a", 20, max_tokens=2)
    assert chunks(h.step()) == [("a", 0, 0, 8, False)]
    assert chunks(h.step()) == [("a", 0, 8, 8, False)]
    assert chunks(h.step()) == [("a", 0, 16, 4, True)]
    assert chunks(h.step()) == [("a", 0, 20, 1, True)]
    assert not h.scheduler.running and h.pool.num_free_blocks == 32


def test_running_requests_first_then_waiting_in_arrival_order():
    h = Harness(64, max_num_batched_tokens=10)
    h.add("a", 6, max_tokens=5)
    h.step()  # a prefilled
    h.add("b", 6)
    h.add("c", 6)
    # a's decode token first, then b whole, then the budget left (3) for c's first chunk.
    assert chunks(h.step()) == [("a", 0, 6, 1, True), ("b", 0, 0, 6, True), ("c", 0, 0, 3, False)]
    assert chunks(h.step()) == [("a", 0, 7, 1, True), ("b", 0, 6, 1, True), ("c", 0, 3, 3, True)]


def test_max_num_seqs_limits_admission():
    h = Harness(64, max_num_seqs=2)
    for rid in "abc":
        h.add(rid, 3, max_tokens=3)
    out = h.step()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in h.scheduler.waiting] == ["c"]
    h.run_to_completion()


def test_preemption_takes_the_newest_running_request_and_requeues_it_first():
    h = Harness(4, max_num_batched_tokens=64, enable_prefix_caching=False)
    a = h.add("a", 4, max_tokens=8)  # each needs 3 blocks by the end
    b = h.add("b", 4, max_tokens=8)
    h.step()  # both admitted: 1 block each
    h.add("c", 2, max_tokens=1)
    preempted = []
    while not preempted:
        out = h.step()
        preempted = out.preempted
    assert preempted == [b]
    assert b.status == RequestStatus.WAITING and h.scheduler.waiting[0] is b
    assert b.samples[0].block_table == [] and b.samples[0].num_computed_tokens == 0
    generated_before = list(b.samples[0].output_token_ids)
    assert generated_before  # it keeps its tokens and recomputes them later
    resumed = None
    while resumed is None:
        out = h.step()
        resumed = next((s for s in out.scheduled if s.request is b), None)
    assert resumed.start == 0 and resumed.num_tokens == 4 + len(generated_before)
    h.run_to_completion()
    assert a.is_finished and b.is_finished and h.scheduler.num_preemptions >= 1
    assert h.pool.num_free_blocks == 4


def test_resumed_request_recomputes_prompt_and_outputs_in_one_chunk():
    h = Harness(16, max_num_batched_tokens=64, enable_prefix_caching=False)
    r = h.add("a", 5, max_tokens=6)
    for _ in range(3):
        h.step()
    assert len(r.samples[0].output_token_ids) == 3
    h.scheduler.preempt(r)
    assert h.scheduler.num_preemptions == 1 and h.pool.num_free_blocks == 16
    # prompt (5) + 3 generated = 8 tokens recomputed, then the 4th token is sampled.
    assert chunks(h.step()) == [("a", 0, 0, 8, True)]


def test_abort_frees_blocks_at_any_point():
    h = Harness(16, max_num_batched_tokens=4)
    a = h.add("a", 10, max_tokens=3)
    b = h.add("b", 3, max_tokens=3)
    h.step()  # a mid-prefill (4 of 10), b waiting
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    h.scheduler.remove(a)
    h.scheduler.remove(b)
    assert h.pool.num_free_blocks == 16
    assert not h.scheduler.running and not h.scheduler.waiting


def test_admission_uses_prefix_cache_and_always_computes_the_last_token():
    h = Harness(16)
    shared = list(range(100, 108))  # two full blocks
    h.add("a", 0, prompt=shared + [1, 2], max_tokens=1)
    h.run_to_completion()
    h.add("b", 0, prompt=shared + [3], max_tokens=1)
    out = h.step()
    assert chunks(out) == [("b", 0, 8, 1, True)] and out.num_cache_hit_tokens == 8
    h.add("c", 0, prompt=shared, max_tokens=1)  # whole prompt cached: the last block is recomputed
    out = h.step()
    assert chunks(out) == [("c", 0, 4, 4, True)] and out.num_cache_hit_tokens == 4


def test_static_batches_admit_only_when_the_previous_batch_is_done():
    h = Harness(64, static_batch_size=2)
    h.add("a", 3, max_tokens=2)
    h.add("b", 3, max_tokens=4)
    h.add("c", 3, max_tokens=2)
    assert {s.request.request_id for s in h.step().scheduled} == {"a", "b"}
    seen = []
    while h.scheduler.running:
        seen.append({s.request.request_id for s in h.step().scheduled})
    assert all("c" not in ids for ids in seen)
    assert {s.request.request_id for s in h.step().scheduled} == {"c"}


def test_n_samples_fork_from_one_prompt_and_copy_the_shared_partial_block():
    h = Harness(16)
    r = h.add("a", 6, max_tokens=3, n=3)
    out = h.step()
    assert chunks(out) == [("a", 0, 0, 6, True)] and out.scheduled[0].fork
    tables = [[b.block_id for b in s.block_table] for s in r.samples]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 2
    assert h.pool.num_free_blocks == 14  # the prompt is held once
    out = h.step()
    assert chunks(out) == [("a", i, 6, 1, True) for i in range(3)]
    assert [src for src, _ in out.copy_pairs] == [tables[0][1]] * 2  # two copies, last writes in place
    assert r.samples[0].block_table[0] is r.samples[2].block_table[0]
    h.run_to_completion()
    assert h.pool.num_free_blocks == 16


def test_preempted_fork_recomputes_prompt_once_then_each_sample():
    h = Harness(32, enable_prefix_caching=False)
    r = h.add("a", 6, max_tokens=5, n=2)
    h.step()
    h.step()
    h.scheduler.preempt(r)
    assert h.pool.num_free_blocks == 32 and not r.forked
    out = h.step()
    assert chunks(out) == [("a", 0, 0, 6, False)] and out.scheduled[0].fork
    assert r.samples[1].num_computed_tokens == 6
    out = h.step()
    assert chunks(out) == [("a", 0, 6, 2, True), ("a", 1, 6, 2, True)]
    h.run_to_completion()
    assert h.pool.num_free_blocks == 32


def test_resumed_request_reuses_its_own_cached_blocks():
    h = Harness(16)
    r = h.add("a", 5, max_tokens=6)
    for _ in range(4):
        h.step()  # 5 prompt + 3 generated tokens in the cache: two full blocks
    h.scheduler.preempt(r)
    out = h.step()
    assert chunks(out) == [("a", 0, 8, 1, True)] and out.num_cache_hit_tokens == 8


def test_speculative_proposals_give_their_blocks_back_before_anyone_is_preempted():
    h = Harness(4, max_num_batched_tokens=64, enable_prefix_caching=False)
    a = h.add("a", 4, max_tokens=8)
    b = h.add("b", 4, max_tokens=8)
    h.step()  # both prompts computed: a block each, two free
    h.scheduler.propose = lambda request, sample, max_tokens: [7] * min(4, max_tokens) if request is a else []
    out = h.step()  # a's 4 proposals would take both free blocks and leave b none
    assert out.preempted == []
    assert [(s.request.request_id, s.num_tokens, s.proposed_token_ids) for s in out.scheduled] == [("a", 1, []),
                                                                                                   ("b", 1, [])]
    assert len(a.samples[0].block_table) == 2 and len(b.samples[0].block_table) == 2
    h.scheduler.propose = None
    h.run_to_completion()
    assert h.pool.num_free_blocks == 4
