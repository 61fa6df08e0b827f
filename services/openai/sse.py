"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class EventStream:
    """An SSE response for one request; `send` a JSON chunk, `done` to finish."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})

    async def start(self) -> None:
        """Send the headers (from here on, errors go in the stream, not the status)."""
        await self.response.prepare(self.request)

    async def send(self, chunk: dict[str, Any]) -> None:
        """One `data:` event. Raises ConnectionResetError when the client has gone."""
        payload = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        await self.response.write(f"data: {payload}\n\n".encode())

    async def done(self) -> web.StreamResponse:
        """The closing `data: [DONE]` event; returns the response for the handler to return."""
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
