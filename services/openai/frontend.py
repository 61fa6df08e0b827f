"""What every HTTP handler shares: the Frontend (the served model's name and limits, the tokenizer
and chat template, the metrics, the threads that prepare chat prompts) and its link to the router.

Rendering a chat template and tokenizing its output cost time in proportion to the client's
text, so they run on a small pool of threads owned by the Frontend (`prepare`), never on the
event loop; a bounded number may run or wait at once, and beyond that a request gets a 503.

RouterLink is the front end's gRPC client of the router: model info, health, and Generate
streams that are cancelled (so the router aborts the request and frees its KV blocks) whenever
the consumer stops early: an HTTP client that went away, an error, or a task cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.models.grammar import compiler_for
from pdserve.models.source import resolve_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.chat_template import ChatTemplate
from pdserve.openai.limits import MAX_PREPARING, PREPARE_THREADS, RETRY_AFTER_S
from pdserve.openai.metrics import Metrics
from pdserve.openai.protocol import UNAVAILABLE, OpenAIError, from_rpc_error, invalid
from pdserve.openai.responses import TokenEvent, TokenStrings
from pdserve.openai.sampling import Limits
from pdserve.openai.tools import FORMATS as TOOL_CALL_FORMATS
from pdserve.openai.tools import format_of_template
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.v1 import router_pb2, router_pb2_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class FrontendConfig:
    """How `pdserve serve openai` was configured.

    router: the router's host:port; model_dir: the checkpoint (tokenizer and chat template): a directory,
    a GGUF file or a Hub id;
    model_name: the name clients use (None: the router's GetModelInfo name); api_keys: accepted
    `Authorization: Bearer` keys (empty: no key needed); router_wait_s: how long to wait for
    the router at start; router_security: TLS and the API key for the front end's channel to the router;
    prepare_threads: threads that render and tokenize chat prompts, with at most max_preparing jobs
    running or waiting (beyond: 503 with Retry-After); tool_call_parser: the format the model writes
    tool calls in (pdserve.openai.tools), None to take the chat template's.
    """

    router: str
    model_dir: str
    model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    router_wait_s: float = 120.0
    router_security: ClientSecurity = PLAINTEXT
    prepare_threads: int = PREPARE_THREADS
    max_preparing: int = MAX_PREPARING
    tool_call_parser: str | None = None  # the tool-call format; None: the chat template's (openai/tools.py)

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_FORMATS:
            raise ValueError(f"--tool-call-parser must be one of {list(TOOL_CALL_FORMATS)}, got {self.tool_call_parser!r}")
        if self.prepare_threads < 1 or self.max_preparing < 1:
            raise ValueError(f"--chat-prepare-threads ({self.prepare_threads}) and --chat-max-preparing "
                             f"({self.max_preparing}) must be >= 1")


class Frontend:
    """The shared state of the OpenAI server (one per process); handlers find it with
    `frontend_of(request)`. config.prepare_threads threads prepare chat prompts, with at most
    config.max_preparing jobs running or waiting."""

    def __init__(self, config: FrontendConfig, link: RouterLink, tokenizer: Tokenizer,
                 info: router_pb2.ModelInfo) -> None:
        self.config = config
        self.link = link
        self.tokenizer = tokenizer
        self.info = info
        self.model_name = config.model_name or info.model_name
        self.limits = Limits(info.max_model_len, info.max_n or 1, info.max_logprobs, info.vocab_size or 2**32)
        self.strings = TokenStrings(tokenizer)
        self.metrics = Metrics()
        self.created = int(time.time())
        source = tokenizer.chat_template
        self.chat_template = ChatTemplate(source, tokenizer.bos_token, tokenizer.eos_token) if source else None
        self.tool_call_format = config.tool_call_parser or format_of_template(source)
        self.grammars = compiler_for(tokenizer, info.vocab_size)
        self.max_preparing = config.max_preparing
        self.preparing = 0  # jobs submitted to the pool and not finished (running or queued)
        self._pool = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="pdserve-openai-prepare")

    @classmethod
    async def connect(cls, config: FrontendConfig) -> Frontend:
        """Load the tokenizer and ask the router for the model's facts (waiting for it to come up)."""
        tokenizer = resolve_model(config.model_dir).tokenizer()
        link = RouterLink(config.router, config.router_security)
        try:
            info = await link.model_info(config.router_wait_s)
        except grpc.aio.AioRpcError as error:
            await link.close()
            raise ValueError(f"cannot reach the router at {config.router} within {config.router_wait_s}s "
                             f"({error.code().name}: {error.details()})") from error
        if sorted(tokenizer.eos_token_ids) != sorted(info.eos_token_ids):
            await link.close()
            raise ValueError(f"--model {config.model_dir} is not the router's model: its eos token ids "
                             f"{sorted(tokenizer.eos_token_ids)} differ from the router's {list(info.eos_token_ids)}")
        return cls(config, link, tokenizer, info)

    async def prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the preparation threads. A 503 with Retry-After when max_preparing jobs
        are already running or queued. A job counts until it really ends: a cancelled request
        frees its slot at once only if its job had not started."""
        if self.preparing >= self.max_preparing:
            raise OpenAIError(503, f"the server is preparing {self.preparing} prompts already; retry shortly",
                              UNAVAILABLE, None, "server_busy", {"Retry-After": str(RETRY_AFTER_S)})
        loop = asyncio.get_running_loop()
        self.preparing += 1
        job = self._pool.submit(fn, *args)
        job.add_done_callback(lambda _: self._release_soon(loop))
        return await asyncio.wrap_future(job)

    def _release_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first (shutdown): nothing to count
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self.preparing -= 1

    async def close(self) -> None:
        """Close the router channel and stop the preparation threads (queued jobs are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.link.close()

    def check_model(self, body: dict[str, Any]) -> str:
        """The served model's name when the request names it (or names none); else a 404."""
        model = body.get("model")
        if model is None or model == self.model_name:
            return self.model_name
        if not isinstance(model, str):
            raise invalid("model must be a string", "model")
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise OpenAIError(404, f"The model `{shown}` does not exist; this server serves `{self.model_name}`.",
                          param="model", code="model_not_found")


FRONTEND_KEY = web.AppKey("frontend", Frontend)


def frontend_of(request: web.Request) -> Frontend:
    """The Frontend of the application serving `request`."""
    return request.app[FRONTEND_KEY]


def event_from_response(response: router_pb2.GenerateResponse, prompt_index: int, n: int) -> TokenEvent:
    """The TokenEvent for one Generate response of prompt `prompt_index` (n samples per prompt)."""
    if response.HasField("prompt_logprobs"):
        return TokenEvent(prompt_index * n, prompt_index=prompt_index, prompt_logprobs=response.prompt_logprobs)
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
