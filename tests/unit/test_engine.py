"""LLMEngine acceptance tests on the real ModelRunner and the tiny Llama checkpoint."""

from __future__ import annotations

import random

import pytest

from helpers.engine_testing import (
    assert_no_leaks,
    greedy,
    load_tiny,
    one_torch_thread,
    random_prompt,
    run_alone,
    run_with_arrivals,
)
from pdserve.engine.request import RequestStatus
from pdserve.models.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        yield load_tiny(tmp_path_factory.mktemp("tiny_llama"))


def _random_workload(seed: int, count: int, max_prompt: int, max_output: int, max_arrival: int):
    rng = random.Random(seed)
    return [(rng.randrange(max_arrival), random_prompt(rng, rng.randint(1, max_prompt)),
             greedy(rng.randint(1, max_output))) for _ in range(count)]


def test_batch_invariance_under_random_arrivals(tiny):
    workload = _random_workload(seed=1, count=32, max_prompt=90, max_output=24, max_arrival=40)
    engine = tiny.engine(max_num_seqs=12, max_num_batched_tokens=64)
    results = run_with_arrivals(engine, workload)
    assert engine.stats().counters.num_prefill_tokens_computed > 0
    for i, (_, prompt, params) in enumerate(workload):
        alone = run_alone(tiny, prompt, params)
        got = results[f"r{i}"].samples[0]
        assert got.token_ids == alone.samples[0].token_ids, f"request {i}"
        assert len(got.token_ids) == params.max_tokens and got.finish_reason == "length"
        assert got.text == alone.samples[0].text
    assert_no_leaks(engine)


def test_preemption_by_recompute_keeps_outputs(tiny):
    workload = _random_workload(seed=2, count=24, max_prompt=60, max_output=60, max_arrival=10)
    reference = run_with_arrivals(tiny.engine(), workload)
    # 10 blocks of 16 tokens: any request fits alone (<= 120 tokens = 8 blocks), few at once.
    engine = tiny.engine(num_blocks=10, max_num_batched_tokens=128, enable_prefix_caching=False)
    results = run_with_arrivals(engine, workload)
    assert engine.stats().num_preemptions >= 10
    for request_id, result in reference.items():
        assert results[request_id].samples[0].token_ids == result.samples[0].token_ids, request_id
        assert results[request_id].samples[0].text == result.samples[0].text, request_id
    assert_no_leaks(engine)


def test_preemption_with_prefix_cache_and_n_samples_keeps_outputs(tiny):
    rng = random.Random(3)
    workload = [(rng.randrange(6), random_prompt(rng, rng.randint(20, 50)),
                 SamplingParams(max_tokens=rng.randint(8, 30), n=rng.choice([1, 2, 3]), seed=i,
                                temperature=0.8, ignore_eos=True)) for i in range(16)]
    reference = run_with_arrivals(tiny.engine(), workload)
    engine = tiny.engine(num_blocks=16, max_num_batched_tokens=96)
    results = run_with_arrivals(engine, workload)
    assert engine.stats().num_preemptions >= 3
    for request_id, result in reference.items():
        got = [s.token_ids for s in results[request_id].samples]
        assert got == [s.token_ids for s in result.samples], request_id
    assert_no_leaks(engine)


def _state(engine, request_id) -> str:
    request = engine.requests[request_id]
    if request.status == RequestStatus.WAITING:
        return "queued"
    lead_sample = request.lead_sample
    if lead_sample.num_computed_tokens < request.num_prompt_tokens:
        return "prefill"
    return "decode"


def test_random_aborts_leave_no_leaked_blocks(tiny):
    rng = random.Random(4)
    engine = tiny.engine(num_blocks=48, max_num_seqs=16, max_num_batched_tokens=24)
    total, added, step = 1000, 0, 0
    deadlines: dict[str, int] = {}  # request id -> the step at which it is aborted
    aborted_in = {"queued": 0, "prefill": 0, "decode": 0}
    while added < total or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 6)):
            if added < total:
                # Too many tokens to finish before the abort deadline.
                params = SamplingParams(max_tokens=64, n=rng.choice([1, 1, 2]),
                                        temperature=rng.choice([0.0, 1.0]), seed=added, ignore_eos=True)
                engine.add_request(str(added), random_prompt(rng, rng.randint(1, 60)), params)
                deadlines[str(added)] = step + rng.randint(0, 12)
                added += 1
        for request_id in [r for r, deadline in deadlines.items() if deadline <= step]:
            aborted_in[_state(engine, request_id)] += 1
            assert engine.abort_request(request_id)
            del deadlines[request_id]
        for out in engine.step():
            assert not out.finished or all(s.finish_reason == "abort" for s in out.samples)
        step += 1
    assert sum(aborted_in.values()) == total
    assert min(aborted_in.values()) >= 50, aborted_in
    assert engine.stats().counters.num_aborted_requests == total
    assert not engine.abort_request("0")  # long gone
    assert_no_leaks(engine)


def test_prefix_cache_computes_only_the_new_tokens(tiny):
    rng = random.Random(5)
    shared = random_prompt(rng, 256)
    first, second = shared + random_prompt(rng, 20), shared + random_prompt(rng, 30)
    params = greedy(8)
    engine = tiny.engine()
    engine.generate([first], params)
    before = engine.stats().counters
    (result,) = engine.generate([second], params)
    after = engine.stats().counters
    assert after.num_cache_hit_tokens - before.num_cache_hit_tokens == 256
    assert result.cached_tokens == 256
    assert after.num_prefill_tokens_computed - before.num_prefill_tokens_computed == 30
    assert after.num_decode_tokens_computed - before.num_decode_tokens_computed == 7
    uncached = run_alone(tiny, second, params, enable_prefix_caching=False)
    assert result.samples[0].token_ids == uncached.samples[0].token_ids
    assert_no_leaks(engine)


def test_queued_prompt_work_excludes_prefix_cache_hits_and_computed_chunks(tiny):
    # What a prefill server reports as its queue (the router balances on it): a waiting prompt whose
    # first 256 tokens the cache holds counts its 30 others; a chunked one only what is left.
    rng = random.Random(7)
    shared = random_prompt(rng, 256)
    engine = tiny.engine(max_num_batched_tokens=64)
    engine.generate([shared + random_prompt(rng, 20)], greedy(1))
    engine.add_request("hit", shared + random_prompt(rng, 30), greedy(1))
    engine.add_request("miss", random_prompt(rng, 100), greedy(1))
    stats = engine.stats()
    assert stats.num_waiting_prompt_tokens == 286 + 100
    assert stats.num_prompt_tokens_to_compute == 30 + 100
    engine.step()  # 64 tokens of budget: "hit" computes its 30, "miss" its first 34
    assert engine.stats().num_prompt_tokens_to_compute == 100 - 34
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_prompt_tokens_to_compute == 0
    assert_no_leaks(engine)


def test_n_samples_share_prompt_blocks_and_reproduce_with_a_seed(tiny):
    rng = random.Random(6)
    prompt = random_prompt(rng, 40)  # 2 full blocks + 8 tokens in a third
    params = SamplingParams(max_tokens=12, n=4, seed=1234, temperature=1.0, ignore_eos=True)
    engine = tiny.engine(num_blocks=64)
    engine.add_request("n4", prompt, params)
    engine.step()  # prefill + fork: the prompt's 3 blocks are held once
    assert engine.stats().num_blocks_used == 3
    engine.step()  # each sample wrote its first token: 3 private copies of the partial block
    assert engine.stats().num_blocks_used == 2 + 4
    assert engine.stats().num_running_seqs == 4
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)
    first = run_alone(tiny, prompt, params)
    again = tiny.engine().generate([random_prompt(rng, 30), prompt], [params, params])[1]
    samples = [s.token_ids for s in first.samples]
    assert samples == [s.token_ids for s in again.samples]
    assert len({tuple(s) for s in samples}) > 1  # the samples differ from one another
    single = run_alone(tiny, prompt, SamplingParams(max_tokens=12, seed=1234, ignore_eos=True))
    assert single.samples[0].token_ids == samples[0]  # sample 0 draws from (seed, 0, position)


def test_samples_that_finish_at_the_fork_release_their_blocks(tiny):
    engine = tiny.engine(num_blocks=32)
    prompt = random_prompt(random.Random(8), 21)
    (one,) = engine.generate([prompt], SamplingParams(max_tokens=1, n=4, seed=5, ignore_eos=True))
    assert [len(s.token_ids) for s in one.samples] == [1, 1, 1, 1]
    assert {s.finish_reason for s in one.samples} == {"length"}
    first_tokens = [s.token_ids[0] for s in one.samples]
    stop_on = first_tokens[0]  # sample 0 stops at once, the others go on unless they drew it too
    params = SamplingParams(max_tokens=6, n=4, seed=5, ignore_eos=True, stop_token_ids=(stop_on,))
    (mixed,) = engine.generate([prompt], params)
    for sample, first in zip(mixed.samples, first_tokens):
        assert sample.token_ids[0] == first
        if first == stop_on:
            assert sample.token_ids == [first] and sample.finish_reason == "stop"
    assert_no_leaks(engine)


def test_static_batches_wait_for_the_whole_batch(tiny):
    workload = _random_workload(seed=7, count=10, max_prompt=30, max_output=12, max_arrival=1)
    engine = tiny.engine(static_batch_size=4)
    for i, (_, prompt, params) in enumerate(workload):
        engine.add_request(f"r{i}", prompt, params)
    batches, seen, active = [], set(), set()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        new = {o.request_id for o in outputs} - seen
        if new:
            assert not active, "admitted requests while a batch was running"
            batches.append(new)
            seen |= new
            active |= new
        active -= {o.request_id for o in outputs if o.finished}
    assert [len(b) for b in batches] == [4, 4, 2]
    assert_no_leaks(engine)


def test_invalid_requests_are_rejected_and_the_engine_keeps_serving(tiny):
    engine = tiny.engine(num_blocks=8, max_model_len=100)
    engine.add_request("a", [5, 6, 7], greedy(4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("b", [], greedy(4))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("b", [5] * 90, greedy(20))
    with pytest.raises(ValueError, match="token ids must be"):
        engine.add_request("b", [5, 100_000], greedy(4))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("b", [5] * 50, SamplingParams(max_tokens=40, n=4))
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)
