"""LLMEngine.step(aborting=...): a request being aborted leaves a prefill step after the layer
where that became known. A step whose requests all left stops and keeps nothing of itself; one
that goes on computes the rest without them. Either way the aborts then free every block, and the
requests that stayed and later ones (the same prompt included: no half-computed prefix-cache
entry) get exactly the tokens of an engine that never saw the requests that left."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.setup import EngineArgs, build_engine
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model

PROMPT = list(range(5, 5 + 100))  # several full blocks: a prefix-cache entry if the step were kept
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("interrupt") / "tiny", arch="llama", seed=0))


def _engine(model_dir: str):
    engine, _ = build_engine(EngineArgs(model=model_dir, kv_cache_mb=16))
    return engine


def test_an_interrupted_step_keeps_nothing_and_the_aborts_free_every_block(model_dir):
    engine = _engine(model_dir)
    free_before = engine.stats().num_blocks_free
    engine.add_request("gone-a", PROMPT, GREEDY)
    engine.add_request("gone-b", PROMPT[::-1], GREEDY)
    layers_run = []

    def aborting(request_ids: set[str]) -> set[str]:
        layers_run.append(set(request_ids))
        return request_ids if len(layers_run) == 2 else set()  # the clients left while layer 1 computed

    assert engine.step(aborting=aborting) == []
    assert len(layers_run) == 2 and layers_run[0] == {"gone-a", "gone-b"}
    assert engine.counters.num_interrupted_steps == 1
    assert engine.counters.num_prefill_tokens_computed == 0
    assert engine.abort_request("gone-a") and engine.abort_request("gone-b")
    engine.step()  # delivers the aborted outputs
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats.num_blocks_free == free_before and stats.num_blocks_cached == 0

    want = [r.samples[0].token_ids for r in _engine(model_dir).generate([PROMPT], GREEDY)]
    assert [r.samples[0].token_ids for r in engine.generate([PROMPT], GREEDY)] == want


def _tokens(outputs, request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for s in o.samples for t in s.token_ids]


def test_a_request_that_leaves_a_shared_step_is_dropped_and_the_rest_is_unchanged(model_dir):
    engine = _engine(model_dir)
    free_before = engine.stats().num_blocks_free
    leaving_prompt = [(7 * i) % 400 + 5 for i in range(230)]
    engine.add_request("stays", PROMPT, GREEDY)
    engine.add_request("leaves", leaving_prompt, GREEDY)
    seen: list[set[str]] = []  # per layer: the requests whose K/V the hook was told about

    def hook(layer: int, infos) -> None:
        seen.append({i.request_id for i in infos})

    def aborting(request_ids: set[str]) -> set[str]:
        return request_ids & {"leaves"}  # its client left while layer 0 computed

    outputs = engine.step(layer_hook=hook, aborting=aborting)
    assert seen == [{"stays", "leaves"}, {"stays"}]  # layer 1 computed only the request that stayed
    assert [o.request_id for o in outputs] == ["stays"]
    assert engine.counters.num_dropped_chunks == 1 and engine.counters.num_interrupted_steps == 0
    assert engine.counters.num_prefill_tokens_computed == len(PROMPT)
    assert engine.abort_request("leaves")
    while engine.has_unfinished_requests():
        outputs += engine.step(aborting=aborting)
    reference = _engine(model_dir)
    want = [r.samples[0].token_ids for r in reference.generate([PROMPT, leaving_prompt], GREEDY)]
    assert _tokens(outputs, "stays") == want[0]
    assert engine.stats().num_blocks_free == free_before

    # Nothing of the dropped prompt entered the prefix cache: it is computed again, in full, and right.
    engine.counters.num_cache_hit_tokens = 0
    assert [r.samples[0].token_ids for r in engine.generate([leaving_prompt], GREEDY)] == [want[1]]
    assert engine.counters.num_cache_hit_tokens == 0


async def _leave_during_layer_0(stream, in_layer_0: threading.Event, leave_done: threading.Event) -> None:
    """The client of `stream` leaves while the engine thread is held inside layer 0: a pending read
    is cancelled and the stream closed (which queues the abort), then the engine is let go."""
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.to_thread(in_layer_0.wait, 10)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await stream.aclose()
    leave_done.set()


async def _tokens_of(stream) -> list[int]:
    return [t async for o in stream for s in o.samples for t in s.token_ids]


def test_a_stream_closed_mid_step_leaves_the_step_and_the_other_stream_is_unchanged(model_dir):
    """AsyncEngine end to end: one of two callers sharing a prefill step leaves while layer 0
    computes; layer 1 computes only the other, whose tokens are those of a run without it."""
    engine = _engine(model_dir)
    in_layer_0, leave_done = threading.Event(), threading.Event()
    seen: list[set[str]] = []

    def hook(layer: int, infos) -> None:
        seen.append({i.request_id for i in infos})
        if len(seen) == 1:
            in_layer_0.set()
            leave_done.wait(10)

    async def scenario():
        async_engine = AsyncEngine(engine, layer_hook=hook)
        async_engine.start()
        try:
            leaving = async_engine.generate("leaving", PROMPT[::-1], GREEDY)
            staying = async_engine.generate("staying", PROMPT, GREEDY)
            collected = asyncio.ensure_future(_tokens_of(staying))
            await _leave_during_layer_0(leaving, in_layer_0, leave_done)
            tokens = await collected
            return tokens, await async_engine._call(lambda e: (e.counters.num_dropped_chunks, e.stats()))
        finally:
            async_engine.shutdown()

    tokens, (dropped, stats) = asyncio.run(scenario())
    assert seen[:2] == [{"leaving", "staying"}, {"staying"}]
    assert dropped == 1
    assert tokens == [r.samples[0].token_ids for r in _engine(model_dir).generate([PROMPT], GREEDY)][0]
    assert (stats.num_running_requests, stats.num_waiting_requests) == (0, 0)
    assert stats.num_blocks_free == stats.num_blocks_total


def test_a_step_that_is_not_interrupted_is_unchanged_and_decode_steps_are_never_asked(model_dir):
    engine = _engine(model_dir)
    asked = []

    def never(request_ids: set[str]) -> set[str]:
        asked.append(len(request_ids))
        return set()

    engine.add_request("kept", PROMPT, GREEDY)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step(aborting=never)
    tokens = [t for o in outputs for s in o.samples for t in s.token_ids]
    want = [r.samples[0].token_ids for r in _engine(model_dir).generate([PROMPT], GREEDY)]
    assert tokens == want[0]
    layers = len(asked)
    assert layers > 0 and engine.counters.num_interrupted_steps == 0
    # Only the prefill step asked (once per layer); the 7 decode steps after it did not.
    assert layers == len(engine.runner.kv_caches)


def test_a_stream_closed_mid_step_stops_the_step_after_the_current_layer(model_dir):
    """AsyncEngine end to end: the caller leaves while layer 0 computes (the hook holds the
    engine thread there); the step stops after that layer and the request is gone."""
    engine = _engine(model_dir)
    in_layer_0, leave_done = threading.Event(), threading.Event()
    layers_seen = []

    def hook(layer: int, infos) -> None:
        layers_seen.append(layer)
        if layer == 0:
            in_layer_0.set()
            leave_done.wait(10)

    async def scenario():
        async_engine = AsyncEngine(engine, layer_hook=hook)
        async_engine.start()
        try:
            await _leave_during_layer_0(async_engine.generate("leaving", PROMPT, GREEDY), in_layer_0, leave_done)
            return await async_engine._call(lambda e: (e.counters.num_interrupted_steps, e.stats()))
        finally:
            async_engine.shutdown()

    interrupted, stats = asyncio.run(scenario())
    assert interrupted == 1
    assert (stats.num_running_requests, stats.num_waiting_requests) == (0, 0)
    assert stats.num_blocks_free == stats.num_blocks_total
    assert layers_seen == [0]  # no layer after the one computing when the client left
