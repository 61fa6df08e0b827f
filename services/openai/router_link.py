"""The front end's gRPC client of the router: model info, health, and Generate streams that are
cancelled (so the router aborts the request and frees its KV blocks) whenever the consumer
stops early: an HTTP client that went away, an error, or a task cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.openai.errors import from_rpc_error
from pdserve.router.worker_clients import CHANNEL_OPTIONS
from pdserve.runtime.channels import PLAINTEXT, ClientSecurity
from pdserve.v1 import router_pb2, router_pb2_grpc


@dataclass
class TokenEvent:
    """New tokens (chunk) or the end (finish_reason set) of one choice.

    choice: the OpenAI choice index (prompt index * n + sample index); text, token_ids,
    logprobs (one per token id, may be empty) and top_logprobs (per token: [(id, logprob)],
    most likely first) are this event's additions; prompt_tokens/completion_tokens/
    cached_tokens are set on the final event only.
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


def event_from_response(response: router_pb2.GenerateResponse, prompt_index: int, n: int) -> TokenEvent:
    """The TokenEvent for one Generate response of prompt `prompt_index` (n samples per prompt)."""
    if response.HasField("chunk"):
        c = response.chunk
        top = [list(zip(t.token_ids, t.logprobs)) for t in c.top_logprobs]
        return TokenEvent(prompt_index * n + c.index, c.text, list(c.token_ids), list(c.logprobs), top,
                          prompt_index=prompt_index)
    done = response.complete
    return TokenEvent(prompt_index * n + done.index, finish_reason=done.finish_reason, prompt_index=prompt_index,
                      prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                      cached_tokens=done.cached_tokens)


class RouterLink:
    """One channel to the router (`address` host:port), shared by all HTTP requests; `security`:
    TLS / mutual TLS and the API key sent to the router (plaintext, no key by default)."""

    def __init__(self, address: str, security: ClientSecurity = PLAINTEXT) -> None:
        self.address = address
        self.channel = security.aio_channel(address, CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    async def model_info(self, timeout_s: float) -> router_pb2.ModelInfo:
        """GetModelInfo, waiting up to timeout_s for the router to come up."""
        return await self.stub.GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=timeout_s,
                                            wait_for_ready=True)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether the router's grpc.health.v1 check answers SERVING within timeout_s."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def generate(self, request: router_pb2.GenerateRequest, prompt_index: int = 0,
                       prompt_param: str = "prompt") -> AsyncIterator[TokenEvent]:
        """TokenEvents of one Generate call. Closing or cancelling the iterator cancels the call.
        A router error becomes an OpenAIError (`prompt_param` named for a too-long prompt)."""
        n = request.sampling.n if request.sampling.HasField("n") else 1
        call = self.stub.Generate(request)
        try:
            async for response in call:
                yield event_from_response(response, prompt_index, n)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, prompt_param) from error
        finally:
            call.cancel()  # no-op when the call already ended; else the router aborts the request

    async def generate_many(self, requests: Sequence[router_pb2.GenerateRequest],
                            prompt_param: str = "prompt") -> AsyncIterator[TokenEvent]:
        """TokenEvents of several Generate calls (one per prompt, run concurrently) as they come.
        The first error cancels every call and is raised; so does closing the iterator."""
        if len(requests) == 1:
            async with contextlib.aclosing(self.generate(requests[0], 0, prompt_param)) as events:
                async for event in events:
                    yield event
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(r, i, prompt_param, queue)) for i, r in enumerate(requests)]
        try:
            for _ in tasks:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, request: router_pb2.GenerateRequest, index: int, prompt_param: str,
                    queue: asyncio.Queue) -> None:
        try:
            async with contextlib.aclosing(self.generate(request, index, prompt_param)) as events:
                async for event in events:
                    queue.put_nowait(event)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(error)
            return
        queue.put_nowait(None)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()
