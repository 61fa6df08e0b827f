"""The load generator: sends a workload to a router's pdserve.v1.Router/Generate on an arrival
schedule (or under a concurrency cap) and times every streamed token."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import grpc

from pdserve.bench.serve_datasets import BenchRequest
from pdserve.bench.serve_metrics import RequestRecord
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.v1 import router_pb2, router_pb2_grpc


@dataclass(frozen=True)
class LoadSpec:
    """How requests are sent: arrival offsets (seconds from the start, one per request), an
    optional cap on requests in flight, sampling temperature, per-request timeout."""

    offsets: tuple[float, ...]
    max_concurrency: int | None = None
    temperature: float = 0.0
    timeout_s: float = 600.0
    progress: bool = True


@dataclass(frozen=True)
class ModelFacts:
    """What the benchmark needs from GetModelInfo."""

    model_name: str
    vocab_size: int
    max_model_len: int


def model_facts(address: str, timeout_s: float = 30.0, security: ClientSecurity = PLAINTEXT) -> ModelFacts:
    """Ask the router what it serves (vocabulary and length limit for the workload)."""
    with security.channel(address, CHANNEL_OPTIONS) as channel:
        info = router_pb2_grpc.RouterStub(channel).GetModelInfo(
            router_pb2.GetModelInfoRequest(), timeout=timeout_s, wait_for_ready=True)
    return ModelFacts(info.model_name, info.vocab_size, info.max_model_len)


def generate_request(request: BenchRequest, temperature: float, seed: int) -> router_pb2.GenerateRequest:
    """The Generate call for one benchmark request: exactly output_len tokens (ignore_eos)."""
    sampling = router_pb2.SamplingParams(max_tokens=request.output_len, temperature=temperature,
                                         ignore_eos=True, seed=seed)
    return router_pb2.GenerateRequest(prompt_token_ids=router_pb2.TokenIds(ids=request.prompt_token_ids),
                                      sampling=sampling)


async def send_one(stub: router_pb2_grpc.RouterStub, message: router_pb2.GenerateRequest,
                   record: RequestRecord, timeout_s: float, token_ids: list[int] | None = None) -> None:
    """Stream one request and fill `record` with its timings (errors are recorded, not raised);
    the streamed token ids are appended to token_ids when given."""
    start = time.perf_counter()
    last, tokens = start, 0
    try:
        async for response in stub.Generate(message, timeout=timeout_s):
            now = time.perf_counter()
            if not (response.HasField("chunk") and response.chunk.token_ids):
                continue
            count = len(response.chunk.token_ids)
            if token_ids is not None:
                token_ids.extend(response.chunk.token_ids)
            if tokens == 0:
                record.ttft = now - start
                record.itl.extend([0.0] * (count - 1))  # tokens that came with the first one
            else:
                record.itl.extend([(now - last) / count] * count)
            tokens += count
            last = now
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    record.e2e = last - start
    record.output_tokens = tokens
    record.success = not record.error and tokens > 0
    if not record.error and tokens == 0:
        record.error = "the stream ended without tokens"


class Progress:
    """A plain-text progress bar on stderr (rewritten in place on a terminal, else every 10%)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.done, self.failed = 0, 0
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def advance(self, ok: bool) -> None:
        """One more request finished."""
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        decile = self.done * 10 // max(self.total, 1)
        if not self.tty and decile == self._last_decile and self.done != self.total:
            return
        self._last_decile = decile
        filled = self.done * self.width // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} requests, "
                f"{self.failed} failed, {time.perf_counter() - self.started:.1f} s")
        end = "" if self.tty and self.done < self.total else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


async def run_load(address: str, requests: list[BenchRequest], load: LoadSpec,
                   seed: int = 0, security: ClientSecurity = PLAINTEXT) -> list[RequestRecord]:
    """Send every request at its offset (waiting for a free slot under max_concurrency) and
    return their records, in workload order; send_time is seconds from the first send.
    security: TLS and the API key to dial the router with."""
    if len(load.offsets) != len(requests):
        raise ValueError(f"{len(load.offsets)} arrival offsets for {len(requests)} requests")
    records = [RequestRecord(r.prompt_len, r.output_len) for r in requests]
    limit = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    progress = Progress(len(requests), load.progress)
    async with security.aio_channel(address, CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + load.offsets[i] - time.perf_counter()))
            if limit is not None:
                await limit.acquire()
            try:
                records[i].send_time = time.perf_counter() - start
                message = generate_request(requests[i], load.temperature, seed + i)
                await send_one(stub, message, records[i], load.timeout_s)
            finally:
                if limit is not None:
                    limit.release()
            progress.advance(records[i].success)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
    return records
