"""Keepalive outputs on a worker's output stream: a request waiting for a batch slot produces
nothing for as long as it waits, and the router takes a silent stream for a hung worker
(`--stream-idle-timeout-s`). A stream wrapped here sends an empty RequestOutput (no samples,
not finished) after every `interval_s` of silence, so waiting is told apart from failing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pdserve.v1 import worker_pb2


async def with_keepalive(outputs: AsyncIterator[worker_pb2.RequestOutput], request_id: str,
                         interval_s: float) -> AsyncIterator[worker_pb2.RequestOutput]:
    """`outputs`, with `RequestOutput(request_id=request_id)` yielded after each interval_s in
    which `outputs` produced nothing. Closing this iterator closes `outputs`."""
    iterator = aiter(outputs)
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield worker_pb2.RequestOutput(request_id=request_id)
                continue
            finished, pending = pending, None
            try:
                output = finished.result()
            except StopAsyncIteration:
                return
            yield output
    finally:
        if pending is not None:  # the consumer left mid-wait: stop the inner stream where it waits
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        if hasattr(iterator, "aclose"):
            await iterator.aclose()
