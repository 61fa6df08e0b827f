"""Building OpenAI responses from the router's token stream, the parts completions and chat share.

- TokenEvent: one step of that stream (new tokens of a choice, or its end), as RouterLink yields it.
- `collect` folds a whole stream into choices and usage (non-streaming responses).
- `relay_stream` sends it as server-sent events, OpenAI's framing: `data: {json}\\n\\n` per chunk,
  then `data: [DONE]`. The first event is awaited before any byte is sent, so a request the
  router refuses at once (bad parameters, prompt too long, overloaded) still gets a proper HTTP
  status; an error after that goes into the stream as an OpenAI error object. If the client goes
  away, the write fails or the handler is cancelled, and closing `events` cancels the gRPC calls.
  A client that stops reading counts as gone once a write has waited stream_write_timeout_s.
- Logprobs in OpenAI's two shapes, from the router's per-token logprobs and top alternatives.
  Completions (legacy): {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
  Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.limits import HTTP_OPTIONS_KEY
from pdserve.openai.metrics import Metrics
from pdserve.openai.protocol import OpenAIError, internal
from pdserve.v1 import router_pb2

logger = logging.getLogger("pdserve.openai")


@dataclass
class TokenEvent:
    """New tokens (chunk) or the end (finish_reason set) of one choice.

    choice: the OpenAI choice index (prompt index * n + sample index); text, token_ids,
    logprobs (one per token id, may be empty) and top_logprobs (per token: [(id, logprob)],
    most likely first) are this event's additions; prompt_tokens/completion_tokens/
    cached_tokens are set on the final event only. An event with prompt_logprobs carries only
    the scores of prompt `prompt_index` (sent once, before its choices' tokens).
    """

    choice: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_index: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: router_pb2.PromptLogprobs | None = None


@dataclass
class ChoiceResult:
    """Everything one choice produced: text, token ids, per-token logprobs and alternatives."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Usage:
    """Token counts of a request: prompt tokens once per prompt, completion tokens per choice."""

    prompt_tokens_by_prompt: dict[int, int] = field(default_factory=dict)
    cached_tokens_by_prompt: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, event: TokenEvent) -> None:
        """Count a final event (finish_reason set); chunks count nothing."""
        if event.finish_reason is None:
            return
        self.prompt_tokens_by_prompt[event.prompt_index] = event.prompt_tokens
        self.cached_tokens_by_prompt[event.prompt_index] = event.cached_tokens
        self.completion_tokens += event.completion_tokens

    def as_json(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        prompt = sum(self.prompt_tokens_by_prompt.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens_by_prompt.values())}}


async def collect(events: AsyncIterator[TokenEvent], num_choices: int,
                  prompt_scores: dict[int, router_pb2.PromptLogprobs] | None = None) -> tuple[list[ChoiceResult], Usage]:
    """Run `events` to the end; returns the choices (by index) and the usage. Prompt scores go
    into `prompt_scores` by prompt index."""
    choices = [ChoiceResult() for _ in range(num_choices)]
    usage = Usage()
    async for event in events:
        if event.prompt_logprobs is not None:
            if prompt_scores is not None:
                prompt_scores[event.prompt_index] = event.prompt_logprobs
            continue
        choice = choices[event.choice]
        choice.text += event.text
        choice.token_ids += event.token_ids
        choice.logprobs += event.logprobs
        choice.top_logprobs += event.top_logprobs
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        usage.add(event)
    return choices, usage


class EventStream:
    """An SSE response for one request; `send` a JSON chunk, `done` to finish."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.write_timeout_s = request.app[HTTP_OPTIONS_KEY].stream_write_timeout_s
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})

    async def start(self) -> None:
        """Send the headers (from here on, errors go in the stream, not the status)."""
        await self.response.prepare(self.request)

    async def send(self, chunk: dict[str, Any]) -> None:
        """One `data:` event. Raises ConnectionResetError when the client has gone, and
        CancelledError when it stopped reading (see _bounded)."""
        payload = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        await self._bounded(self.response.write(f"data: {payload}\n\n".encode()))

    async def done(self) -> web.StreamResponse:
        """The closing `data: [DONE]` event; returns the response for the handler to return."""
        await self._bounded(self.response.write(b"data: [DONE]\n\n"))
        await self._bounded(self.response.write_eof())
        return self.response

    async def _bounded(self, write: Awaitable[None]) -> None:
        """Await a write for at most write_timeout_s; past that, drop the connection."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await write
        except TimeoutError:
            logger.info("dropping a stream whose client read nothing for %g s", self.write_timeout_s)
            # abort, not close: close would wait for the unread bytes to drain, which never happens.
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            # The same end as a client that disconnects (handler_cancellation): the gRPC call is
            # cancelled on the way out, and aiohttp takes it as a quiet disconnect, not a 500.
            raise asyncio.CancelledError from None


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


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenStrings:
    """Each token id's text and raw bytes, as logprobs show them (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.backend.decoder
        self.byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server process
    def text(self, token_id: int) -> str:
        """The token decoded alone (special tokens kept); a partial UTF-8 character shows as U+FFFD."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def raw_bytes(self, token_id: int) -> list[int]:
        """The token's exact bytes: byte-level BPE and `<0xNN>` byte-fallback tokens map back to
        their bytes; other tokens give the UTF-8 of their text."""
        if token_id in self.tokenizer.byte_fallback_ids:
            return [int(self.tokenizer.id_to_token(token_id)[3:5], 16)]
        piece = self.tokenizer.id_to_token(token_id)
        if self.byte_level and piece is not None and token_id not in self.tokenizer.special_token_ids:
            table = _byte_level_decoder()
            if all(ch in table for ch in piece):
                return [table[ch] for ch in piece]
        return list(self.text(token_id).encode("utf-8"))


def completion_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[float],
                        top: list[list[tuple[int, float]]], text_offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object for these tokens; offsets start at text_offset.
    Each top_logprobs dict holds the top-N alternatives plus the chosen token."""
    tokens = [strings.text(t) for t in token_ids]
    offsets, pos = [], text_offset
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    tops = []
    for i in range(len(token_ids)):
        alternatives = {strings.text(t): lp for t, lp in (top[i] if i < len(top) else [])}
        alternatives.setdefault(tokens[i], logprobs[i])
        tops.append(alternatives)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """The chat `logprobs` object ({"content": [...], "refusal": None}) for these tokens."""
    content = []
    for i, token_id in enumerate(token_ids):
        alternatives = [{"token": strings.text(t), "logprob": lp, "bytes": strings.raw_bytes(t)}
                        for t, lp in (top[i] if i < len(top) else [])]
        content.append({"token": strings.text(token_id), "logprob": logprobs[i],
                        "bytes": strings.raw_bytes(token_id), "top_logprobs": alternatives})
    return {"content": content, "refusal": None}
