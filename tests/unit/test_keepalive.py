"""pdserve.workers.keepalive: keepalives in a silent stream, outputs passed through in order,
and a consumer that leaves mid-wait closes the inner stream there."""

from __future__ import annotations

import asyncio
import contextlib

from pdserve.v1 import worker_pb2
from pdserve.workers.keepalive import with_keepalive


def test_keepalives_fill_the_silences_and_outputs_pass_through_in_order():
    async def scenario():
        release = asyncio.Event()

        async def inner():
            yield worker_pb2.RequestOutput(request_id="r", prompt_tokens=1)
            await release.wait()  # a request waiting for a batch slot
            yield worker_pb2.RequestOutput(request_id="r", prompt_tokens=2, finished=True)

        seen = []
        async with contextlib.aclosing(with_keepalive(inner(), "r", 0.01)) as outputs:
            async for output in outputs:
                seen.append(output)
                if sum(1 for o in seen if not o.prompt_tokens) == 3:
                    release.set()
        return seen

    seen = asyncio.run(scenario())
    real = [o.prompt_tokens for o in seen if o.prompt_tokens]
    keepalives = [o for o in seen if not o.prompt_tokens]
    assert real == [1, 2] and seen[0].prompt_tokens == 1 and seen[-1].finished
    assert len(keepalives) >= 3
    assert all(o.request_id == "r" and not o.samples and not o.finished for o in keepalives)


def test_leaving_mid_wait_closes_the_inner_stream_where_it_waits():
    async def scenario():
        closed = asyncio.Event()

        async def inner():
            try:
                await asyncio.Event().wait()  # never produces
                yield worker_pb2.RequestOutput()
            finally:
                closed.set()  # the engine stream's cleanup (its abort) runs here

        async with contextlib.aclosing(with_keepalive(inner(), "r", 0.01)) as outputs:
            first = await anext(outputs)
        assert not first.samples
        return closed.is_set()

    assert asyncio.run(scenario())
