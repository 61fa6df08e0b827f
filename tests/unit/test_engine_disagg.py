"""Disaggregated prefill/decode through two real engines: reservations, the per-layer hook,
prefilled and resumed requests, and no leaked blocks whatever happens.

Engine A plays the prefill server (it runs the request up to its first token; its layer hook
copies each layer's prompt blocks into engine B's reserved blocks, standing in for the KV
transfer); engine B plays the decode server. The reference is a single engine running the
request uninterrupted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from helpers.disagg_testing import (
    PARAMS,
    Samples,
    as_dict,
    disaggregated,
    drain,
    fold,
    kv_copier,
    prefill,
    with_first,
)
from helpers.engine_testing import (
    BLOCK_SIZE,
    assert_no_leaks,
    greedy,
    load_tiny,
    one_torch_thread,
    random_prompt,
    run_alone,
)
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.prefilled import finish_reason_after, first_token_params
from pdserve.models.sampling_params import SamplingParams
from pdserve.runtime.errors import AlreadyExistsError, NotFoundError, OverloadedError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        yield load_tiny(tmp_path_factory.mktemp("tiny_llama_disagg"))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_prefilled_request_continues_like_an_uninterrupted_run(tiny, name):
    params = PARAMS[name]
    prompt = random_prompt(random.Random(31), 37)  # 2 full blocks and a partial one
    got, a, b = disaggregated(tiny, prompt, params)
    assert got == as_dict(run_alone(tiny, prompt, params))
    if params.n == 3 and params.seed is not None:
        assert len({tuple(tokens) for tokens, _, _ in got.values()}) > 1
    # B registered the transferred prompt's full blocks in its prefix cache.
    assert b.generate([prompt], greedy(1))[0].cached_tokens == 32
    assert_no_leaks(a)
    assert_no_leaks(b)


@pytest.mark.parametrize("name", ["greedy", "seeded-n3"])
@pytest.mark.parametrize("k", [1, 4])
def test_resumed_request_recomputes_and_continues_like_an_uninterrupted_run(tiny, name, k):
    params = PARAMS[name]
    prompt = random_prompt(random.Random(32), 29)
    alone = run_alone(tiny, prompt, params)
    indices = [0, 2] if params.n == 3 else [0]  # sample 1 finished elsewhere: not continued
    b = tiny.engine()
    generated = {i: alone.samples[i].token_ids[:k] for i in indices}
    b.add_prefilled_request("r", prompt, params, list(generated.values()), indices, reservation_id=None)
    got = drain(b)["r"]
    assert sorted(got) == indices
    got = {i: (generated[i] + tokens, text, reason) for i, (tokens, text, reason) in got.items()}
    assert got == as_dict(alone, indices)
    assert_no_leaks(b)


def _token_texts(tiny, prompt, max_tokens):
    """The greedy tokens of prompt and the text each token released, from one engine."""
    engine = tiny.engine()
    engine.add_request("ref", prompt, greedy(max_tokens))
    deltas = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.extend([out.samples[0].text] * len(out.samples[0].token_ids))
    return deltas


def _stop_string_cases(tiny):
    """(prompt, stop string) pairs: a stop string inside the first token's text, one spanning the
    first and second tokens' text (held back after the first), and one inside a later token's."""
    rng = random.Random(40)
    cases = {}
    for _ in range(200):
        prompt = random_prompt(rng, rng.randint(5, 30))
        deltas = _token_texts(tiny, prompt, 12)
        full = "".join(deltas)
        candidates = {
            "in-first": deltas[0][:2],
            "across-first-second": deltas[0][-2:] + deltas[1][:1],
            "later": deltas[6][:2],
        }
        offsets = {"in-first": 0, "across-first-second": len(deltas[0]) - 2,
                   "later": len("".join(deltas[:6]))}
        for name, stop in candidates.items():
            ok = len(stop) >= 2 and stop.isprintable() and stop.strip() and full.find(stop) == offsets[name]
            if name not in cases and ok and (name != "across-first-second" or len(deltas[0]) >= 2
                                             and deltas[1]):
                cases[name] = (prompt, stop)
        if len(cases) == 3:
            return cases
    pytest.fail(f"found only {sorted(cases)} stop-string cases in 200 prompts")


def test_stop_strings_count_the_generated_tokens_text(tiny):
    cases = _stop_string_cases(tiny)
    cases["in-first-before-min-tokens"] = cases["in-first"]
    for name, (prompt, stop) in cases.items():
        min_tokens = 3 if name == "in-first-before-min-tokens" else 0
        params = greedy(12, stop=("zzzz", stop), min_tokens=min_tokens)
        want = as_dict(run_alone(tiny, prompt, params))
        assert (want[0][2] == "stop") == (min_tokens == 0), name
        got, a, b = disaggregated(tiny, prompt, params)
        assert got == want, name
        first_finishes = finish_reason_after(a, prompt, params, want[0][0][:1])
        assert first_finishes == ("stop" if name == "in-first" else None), name
        resumed = tiny.engine()
        resumed.add_prefilled_request("r", prompt, params, [want[0][0][:1]])
        assert with_first({0: want[0][0][0]}, drain(resumed)["r"]) == want, name
        for engine in (a, b, resumed):
            assert_no_leaks(engine)


def test_generated_tokens_that_finish_a_sample_end_it_at_once(tiny):
    prompt = random_prompt(random.Random(33), 20)
    b = tiny.engine()
    alone = run_alone(tiny, prompt, greedy(3))
    tokens = alone.samples[0].token_ids
    assert finish_reason_after(b, prompt, greedy(3), tokens) == "length"
    assert finish_reason_after(b, prompt, greedy(3), tokens[:2]) is None
    assert len(b.reserve("res", len(prompt))) == 2
    # Every generated token is there already: the sample ends with "length", no step runs.
    b.add_prefilled_request("r", prompt, greedy(3), [tokens], reservation_id="res")
    assert b.stats().num_blocks_free == b.stats().num_blocks_total  # reservation freed at once
    (out,) = b.step()
    assert out.finished and out.samples[0].token_ids == [] and out.samples[0].finish_reason == "length"
    assert out.samples[0].text == alone.samples[0].text
    assert b.stats().counters.num_steps == 0
    # A stop token id generated by sample 0: it stops at once, sample 1 goes on alone.
    params = greedy(6, n=2, stop_token_ids=(tokens[0],))
    b.add_prefilled_request("s", prompt, params, [[tokens[0]], [tokens[1]]], reservation_id=None)
    got = drain(b)["s"]
    assert got[0] == ([], "", "stop")
    single = tiny.engine()
    single.add_prefilled_request("t", prompt, dataclasses.replace(params, n=1), [[tokens[1]]])
    assert got[1] == drain(single)["t"][0]
    assert len(got[1][0]) >= 1
    assert_no_leaks(b)


def test_layer_hook_reports_chunks_blocks_and_cached_prefix_while_layers_compute(tiny):
    rng = random.Random(34)
    shared = random_prompt(rng, 32)
    engine = tiny.engine(max_num_batched_tokens=16)
    num_layers = tiny.config.num_layers
    calls = []
    fresh_blocks = [True]  # the first request writes blocks that hold zeros in every layer

    def hook(layer, infos):
        (info,) = infos
        bs = BLOCK_SIZE
        positions = range(info.start, info.end)
        slots = [(info.block_ids[p // bs - info.first_block_index], p % bs) for p in positions]
        keys = engine.runner.kv_caches[layer][0]
        assert all(keys[block, offset].abs().sum() > 0 for block, offset in slots)
        if fresh_blocks[0] and layer + 1 < num_layers:  # the next layer has not run yet
            next_keys = engine.runner.kv_caches[layer + 1][0]
            assert all(next_keys[block, offset].abs().sum() == 0 for block, offset in slots)
        calls.append((layer, info))

    first = shared + random_prompt(rng, 8)
    engine.add_request("one", first, greedy(1))
    while engine.has_unfinished_requests():
        engine.step(layer_hook=hook)
    assert [layer for layer, _ in calls] == list(range(num_layers)) * 3
    infos = [info for layer, info in calls if layer == 0]
    assert [(i.start, i.num_tokens, i.first_block_index, i.is_last_chunk_of_prompt) for i in infos] == [
        (0, 16, 0, False), (16, 16, 1, False), (32, 8, 2, True)]
    assert all(len(i.block_ids) == 1 and i.cached_block_ids == () for i in infos)
    first_blocks = [i.block_ids[0] for i in infos]
    # The same 32-token prefix again: a prefix-cache hit, reported as cached_block_ids.
    calls.clear()
    fresh_blocks[0] = False
    engine.add_request("two", shared + random_prompt(rng, 5), greedy(1))
    while engine.has_unfinished_requests():
        engine.step(layer_hook=hook)
    (info,) = [info for layer, info in calls if layer == 0]
    assert (info.start, info.num_tokens, info.is_last_chunk_of_prompt) == (32, 5, True)
    assert list(info.cached_block_ids) == first_blocks[:2] and info.request_id == "two"
    assert_no_leaks(engine)


def test_reservations_are_counted_and_never_leak(tiny):
    b = tiny.engine(num_blocks=8)
    x_blocks, x2_blocks = b.reserve("x", 33), b.reserve("x2", 1)
    assert len(x_blocks) == 3 and len(x2_blocks) == 1 and not set(x_blocks) & set(x2_blocks)
    assert b.stats().num_reservations == 2 and b.stats().num_blocks_reserved == 4
    assert b.stats().num_blocks_free == 4
    with pytest.raises(AlreadyExistsError):
        b.reserve("x", 5)
    with pytest.raises(OverloadedError, match="5 KV blocks, 4 are free"):
        b.reserve("y", 70)
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        b.reserve("y", 0)
    assert b.release_reservation("x") and not b.release_reservation("x")
    b.reserve("t1", 16, expires_at=10.0)
    b.reserve("t2", 16, expires_at=20.0)
    assert b.expire_reservations(15.0) == ["t1"] and b.expire_reservations(15.0) == []
    assert b.expire_reservations(25.0) == ["t2"]
    # A rejected continuation consumes its reservation; an unknown one is NOT_FOUND.
    b.reserve("bad", 10)
    with pytest.raises(ValueError, match="more than max_tokens"):
        b.add_prefilled_request("r", [5] * 10, greedy(2), [[1, 2, 3]], reservation_id="bad")
    with pytest.raises(NotFoundError):
        b.add_prefilled_request("r", [5] * 10, greedy(2), [[1]], reservation_id="bad")
    b.reserve("len", 10)
    with pytest.raises(ValueError, match="holds KV for 10 prompt tokens"):
        b.add_prefilled_request("r", [5] * 11, greedy(2), [[1]], reservation_id="len")
    assert b.release_reservation("x2")
    assert_no_leaks(b)
    # Cached free blocks are evicted for a reservation.
    b.generate([random_prompt(random.Random(35), 100)], greedy(2))
    assert b.stats().num_blocks_cached > 0
    b.reserve("all", 8 * BLOCK_SIZE - 1)
    assert b.stats().num_blocks_free == 0
    assert b.release_reservation("all")
    assert_no_leaks(b)


def test_abort_at_any_point_and_preemption_leave_no_leaked_blocks(tiny):
    rng = random.Random(36)
    a = tiny.engine()
    # Five 2-block prompts and a 1-block reservation fill 11 blocks; after 2 aborts, r0 and r1
    # (3 samples) cannot all grow by 30 tokens in what r3 (ready) leaves -> preemption.
    b = tiny.engine(num_blocks=11, max_num_seqs=4)
    prompts = [random_prompt(rng, rng.randint(17, 30)) for _ in range(5)]
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=i, n=1 + i % 2, ignore_eos=True)
              for i in range(5)]
    firsts = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        block_ids = b.reserve(f"res{i}", len(prompt))
        first = prefill(a, b, f"r{i}", prompt, p, block_ids)
        firsts[f"r{i}"] = {k: token for k, (token, _) in first.items()}
        b.add_prefilled_request(f"r{i}", prompt, p, [[first[k][0]] for k in sorted(first)],
                                reservation_id=f"res{i}")
    assert b.stats().num_waiting_requests == 5  # ready, waiting for sequence slots
    b.reserve("idle", 3)
    assert b.abort_request("r4")  # aborted while ready
    results: dict[str, Samples] = {}
    fold(results, b.step())
    assert b.stats().num_running_seqs == 4 and b.stats().num_waiting_requests == 1
    assert b.abort_request("r2")  # aborted while running
    assert b.release_reservation("idle")
    drain(b, results)
    assert b.stats().num_preemptions >= 1
    for i in (0, 1, 3):
        want = as_dict(run_alone(tiny, prompts[i], params[i]))
        assert with_first(firsts[f"r{i}"], results[f"r{i}"]) == want, i
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_async_engine_reserves_streams_prefilled_requests_and_hooks_layers(tiny):
    prompt = random_prompt(random.Random(37), 45)
    params = PARAMS["seeded-n3"]
    want = as_dict(run_alone(tiny, prompt, params))
    a_engine, b_engine = tiny.engine(), tiny.engine()
    a_engine.generate([prompt], greedy(1))  # A's prefix cache holds the prompt's 2 full blocks
    seen = []

    async def main():
        b = AsyncEngine(b_engine)
        b.start()
        try:
            block_ids = await b.reserve("res", len(prompt))
            assert b.stats().num_reservations == 1
            assert not await b.release_reservation("nope")
            a = AsyncEngine(a_engine, layer_hook=kv_copier(a_engine, b_engine, "req", block_ids, seen))
            a.start()
            try:
                firsts = {}
                async for out in a.generate("req", prompt, first_token_params(params)):
                    firsts.update({s.index: s.token_ids[0] for s in out.samples})
            finally:
                a.shutdown()
            got = {i: ([firsts[i]], "", None) for i in range(params.n)}
            async for out in b.generate_prefilled("req", prompt, params, [[firsts[i]] for i in range(3)],
                                                  reservation_id="res"):
                for s in out.samples:
                    tokens, text, _ = got[s.index]
                    got[s.index] = (tokens + s.token_ids, text + s.text, s.finish_reason)
            with pytest.raises(NotFoundError):
                async for _ in b.generate_prefilled("req2", prompt, params, [[1]], reservation_id="res"):
                    pass
            # Leaving a prefilled stream early aborts it and frees its blocks.
            await b.reserve("res3", len(prompt))
            stream = b.generate_prefilled("req3", prompt, params, [[firsts[0]]], [1], "res3")
            await stream.__anext__()
            await stream.aclose()
            await b.reserve("res4", 3)
            assert await b.expire_reservations(0.0) == []
            assert await b.release_reservation("res4")  # applied after the abort: all is free
            return got, b.stats()
        finally:
            b.shutdown()

    got, stats = asyncio.run(main())
    assert got == want
    assert {info.request_id for _, info in seen} == {"req"}
    assert all(len(info.cached_block_ids) == 2 for _, info in seen)  # sent from A's cache
    assert stats.num_blocks_free == stats.num_blocks_total and stats.num_reservations == 0
    assert not b_engine.requests and all(block.ref_count == 0 for block in b_engine.pool.blocks)
    assert_no_leaks(a_engine)


def test_a_reservation_keeps_what_the_prefix_cache_holds_and_only_the_rest_arrives(tiny):
    """A second turn (history + answer + new message) on the engine that served the first: the
    reservation pins the cached blocks of the history, the prefill side sends only the blocks
    after them, and the tokens equal an uninterrupted run; then nothing leaks."""
    rng = random.Random(35)
    first_turn = random_prompt(rng, 40)
    b = tiny.engine(num_blocks=64)
    answer = b.generate([first_turn], greedy(12))[0].samples[0].token_ids  # B caches 52 tokens' full blocks
    second_turn = first_turn + answer + random_prompt(rng, 9)  # 61 tokens: 3 full blocks cached on B
    params = greedy(10)
    reservation = b.reserve_prompt("res-2", second_turn)
    assert reservation.held_blocks == 3 and len(reservation.block_ids) == 4
    held = reservation.blocks[:3]
    assert all(block.ref_count == 1 and block.is_cached for block in held)  # pinned, still cached
    with pytest.raises(OverloadedError):  # what is left cannot take the pinned blocks
        b.reserve("hog", (b.stats().num_blocks_free + 1) * BLOCK_SIZE)
    hog = b.reserve("hog", b.stats().num_blocks_free * BLOCK_SIZE)  # every free block: no pinned one among them
    assert not set(hog) & set(reservation.block_ids[:3]) and all(block.is_cached for block in held)
    b.release_reservation("hog")
    a = tiny.engine(max_num_batched_tokens=16)
    firsts = prefill(a, b, "r", second_turn, params, reservation.block_ids, held_blocks=3)
    b.add_prefilled_request("r", second_turn, params, [[firsts[0][0]]], reservation_id="res-2")
    got = with_first({0: firsts[0][0]}, drain(b)["r"])
    assert got == as_dict(run_alone(tiny, second_turn, params))
    assert_no_leaks(a)
    assert_no_leaks(b)
    # A Decode whose prompt differs inside the held blocks is refused, and frees the reservation.
    other = list(second_turn)
    other[5] = (other[5] + 1) % 500 + 3
    assert b.reserve_prompt("res-3", second_turn).held_blocks == 3
    with pytest.raises(ValueError, match="other leading tokens"):
        b.add_prefilled_request("s", other, params, [[firsts[0][0]]], reservation_id="res-3")
    assert_no_leaks(b)
    # Released unused, the pinned blocks go back to the cache (a later turn still finds them).
    assert b.reserve_prompt("res-4", second_turn).held_blocks == 3
    assert b.release_reservation("res-4")
    assert_no_leaks(b)
    assert b.reserve_prompt("res-5", second_turn).held_blocks == 3
    b.release_reservation("res-5")
