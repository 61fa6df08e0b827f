"""AsyncEngine: concurrent streams, abort (explicit and by leaving the stream), bad requests."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from helpers.engine_testing import assert_no_leaks, greedy, load_tiny, one_torch_thread, random_prompt
from pdserve.engine.async_engine import AsyncEngine
from pdserve.models.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        yield load_tiny(tmp_path_factory.mktemp("tiny_llama_async"))


async def _collect(engine: AsyncEngine, request_id, prompt, params):
    tokens, text, outputs = [], "", []
    async for out in engine.generate(request_id, prompt, params):
        assert out.request_id == request_id
        outputs.append(out)
        for sample in out.samples:
            tokens += sample.token_ids
            text += sample.text
    return tokens, text, outputs


def test_concurrent_streams_match_the_synchronous_engine(tiny):
    rng = random.Random(21)
    prompts = [random_prompt(rng, rng.randint(3, 40)) for _ in range(8)]
    params = [greedy(rng.randint(2, 20)) for _ in prompts]
    expected = tiny.engine().generate(prompts, params)

    async def main():
        engine = AsyncEngine(tiny.engine())
        engine.start()
        try:
            results = await asyncio.gather(*[_collect(engine, f"req-{i}", p, sp)
                                             for i, (p, sp) in enumerate(zip(prompts, params))])
        finally:
            engine.shutdown()
        assert not engine.is_running
        return results, engine

    results, engine = asyncio.run(main())
    for (tokens, text, outputs), want in zip(results, expected):
        assert tokens == want.samples[0].token_ids and text == want.samples[0].text
        assert outputs[-1].finished and outputs[-1].samples[-1].finish_reason == "length"
        assert not any(o.finished for o in outputs[:-1])
    assert engine.stats().counters.num_finished_requests == 8
    assert_no_leaks(engine.engine)


def test_abort_and_leaving_a_stream_free_everything(tiny):
    long_params = greedy(200)
    prompt = random_prompt(random.Random(22), 20)

    async def main():
        engine = AsyncEngine(tiny.engine(num_blocks=64))
        engine.start()
        try:
            # Explicit abort after the first output: the stream ends with "abort".
            reasons = []
            async for out in engine.generate("a", prompt, long_params):
                if not reasons:
                    assert await engine.abort("a")
                reasons += [s.finish_reason for s in out.samples]
            assert reasons[-1] == "abort" and out.finished
            # Leaving the stream early aborts the request in the engine.
            stream = engine.generate("b", prompt, long_params)
            await stream.__anext__()
            await stream.aclose()
            # Commands are applied in order: once "c" is done, "b" was aborted before it started.
            await _collect(engine, "c", prompt, greedy(3))
            assert not await engine.abort("b")  # no stream of that id is open
            return engine.stats()
        finally:
            engine.shutdown()

    stats = asyncio.run(main())
    assert stats.counters.num_aborted_requests == 2 and stats.counters.num_finished_requests == 1
    assert stats.num_blocks_free == stats.num_blocks_total
    assert stats.num_running_requests == stats.num_waiting_requests == 0


def test_bad_requests_are_rejected_and_the_engine_keeps_serving(tiny):
    async def main():
        engine = AsyncEngine(tiny.engine(max_model_len=64))
        engine.start()
        try:
            with pytest.raises(ValueError, match="empty"):
                await _collect(engine, "x", [], greedy(2))
            with pytest.raises(ValueError, match="max_model_len"):
                await _collect(engine, "x", [5] * 60, greedy(10))
            stream = engine.generate("dup", [5, 6], greedy(50))
            await stream.__anext__()
            with pytest.raises(ValueError, match="already in use"):
                await _collect(engine, "dup", [5, 6], greedy(2))
            await stream.aclose()
            tokens, _, _ = await _collect(engine, "dup", [5, 6], greedy(4))  # the id is free again
            return tokens
        finally:
            engine.shutdown()

    assert len(asyncio.run(main())) == 4


def test_the_engine_steps_outside_the_event_loop_thread(tiny):
    stepping_threads = set()
    sync_engine = tiny.engine()
    original_step = sync_engine.step

    def recording_step(**kwargs):
        stepping_threads.add(threading.get_ident())
        return original_step(**kwargs)

    sync_engine.step = recording_step

    async def main():
        engine = AsyncEngine(sync_engine)
        engine.start()
        try:
            await _collect(engine, "a", [5, 6, 7], SamplingParams(max_tokens=5, seed=3))
        finally:
            engine.shutdown()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert stepping_threads and loop_thread not in stepping_threads
