"""Records a stream's progress in Redis off the relay path: the relay hands each response over
without waiting, and one background writer sends whatever accumulated in a single round trip."""

from __future__ import annotations

import asyncio
import logging

from protos.pdserve.v1 import router_pb2
from services.state.request_store import RequestStore

logger = logging.getLogger("pdserve.router")


class ProgressRecorder:
    """Coalesces a request's tokens and finish reasons and writes them in order, in the
    background; close() flushes the rest. A Redis error is logged, never raised into the stream:
    the client's tokens keep flowing while Redis is away."""

    def __init__(self, store: RequestStore, request_id: str):
        self.store = store
        self.request_id = request_id
        self._tokens: dict[int, list[int]] = {}
        self._finished: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._writer = asyncio.create_task(self._write_forever())

    def record(self, response: router_pb2.GenerateResponse) -> None:
        """Note a response about to be sent to the client (no I/O here)."""
        if response.HasField("chunk") and response.chunk.token_ids:
            self._tokens.setdefault(response.chunk.index, []).extend(response.chunk.token_ids)
        elif response.HasField("complete"):
            self._finished[response.complete.index] = response.complete.finish_reason
        else:
            return
        self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            tokens, finished = self._tokens, self._finished
            self._tokens, self._finished = {}, {}
            if tokens or finished:
                try:
                    await self.store.record_progress(self.request_id, tokens, finished)
                except Exception as exc:  # Redis away or failing: the stream goes on
                    logger.warning("recording progress of %s in Redis failed: %s", self.request_id, exc)
            if self._closing and not (self._tokens or self._finished):
                return

    async def close(self) -> None:
        """Write what is still pending and stop the writer."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(self._writer)
