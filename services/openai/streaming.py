"""Relaying a Generate stream as server-sent events, the part completions and chat share.

The first event is awaited before any byte is sent, so a request the router refuses at once
(bad parameters, prompt too long, overloaded) still gets a proper HTTP status; an error after
that goes into the stream as an OpenAI error object. If the client goes away, the write fails
or the handler is cancelled, and closing `events` cancels the gRPC calls.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web

from pdserve.openai.accumulate import Usage
from pdserve.openai.errors import OpenAIError, internal
from pdserve.openai.metrics import Metrics
from pdserve.openai.router_link import TokenEvent
from pdserve.openai.sse import EventStream

logger = logging.getLogger("pdserve.openai")


class ChunkFormatter(Protocol):
    """Turns TokenEvents into one API's stream chunks."""

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before the first tokens."""

    def chunk(self, event: TokenEvent) -> dict[str, Any] | None:
        """The chunk for an event, or None to send nothing."""

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The final usage-only chunk."""


async def relay_stream(request: web.Request, events: AsyncIterator[TokenEvent], chunks: ChunkFormatter,
                       include_usage: bool, metrics: Metrics) -> web.StreamResponse:
    """Stream `events` to the client as SSE chunks, then the usage chunk (if include_usage) and
    `data: [DONE]`. Raises OpenAIError before the headers go out when the first event fails."""
    first = await anext(events, None)
    stream = EventStream(request)
    await stream.start()
    usage = Usage()
    try:
        for chunk in chunks.opening():
            await _send(stream, chunk, include_usage)
        event = first
        while event is not None:
            usage.add(event)
            chunk = chunks.chunk(event)
            if chunk is not None:
                await _send(stream, chunk, include_usage)
            event = await anext(events, None)
        if include_usage:
            await stream.send(chunks.usage_chunk(usage))
    except OpenAIError as error:
        await stream.send(error.body())
    except OSError:  # the client went away: nothing more to send
        raise
    except Exception as error:  # noqa: BLE001 - the stream is open: report in it, then end it
        logger.exception("stream failed")
        await stream.send(internal(error).body())
    finally:
        usage_json = usage.as_json()
        metrics.count_tokens(usage_json["prompt_tokens"], usage.completion_tokens)
    return await stream.done()


async def _send(stream: EventStream, chunk: dict[str, Any], include_usage: bool) -> None:
    if include_usage:
        chunk["usage"] = None
    await stream.send(chunk)
