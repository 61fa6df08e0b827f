"""The services and methods the fuzz test calls, with a valid request per method for the
mutations to start from. Valid requests keep generation small (max_tokens <= 8, n <= 2); a few
name a real reservation on the decode server (so a mutation can reach the KV transfer and the
continuation paths); every reservation the fuzz is granted is recorded and aborted."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from helpers.bad_input_testing import VOCAB_SIZE
from pdserve.kvtransfer import KVLayout
from pdserve.runtime.channels import PLAINTEXT, ClientSecurity
from pdserve.v1 import colocated_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, router_pb2, worker_pb2, worker_pb2_grpc

WORDS = ["hello", "world", "the", "cat", "sat", "on", "a", "mat", "\u00e9t\u00e9", "\u4e2d\u6587", "\n", "  "]


@dataclass
class FuzzContext:
    """Addresses of the cluster under fuzz, and the request ids holding decode reservations."""

    router: str
    prefill: str
    decode: str
    kv_endpoint: str
    colocated: str
    layout: KVLayout  # the decode server's KV cache layout (what a valid HELLO carries)
    security: ClientSecurity = PLAINTEXT  # how to dial the cluster (its client_security())
    granted: set[str] = field(default_factory=set)
    _channel: tuple | None = None

    def decode_channel(self) -> grpc.aio.Channel:
        """A channel to the decode server for the running event loop."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._channel[0] is not loop:
            self._channel = (loop, self.security.aio_channel(self.decode, ()))
        return self._channel[1]

    async def reserve(self, rng: random.Random, prompt_tokens: int, lease_ms: int = 3000) -> decode_pb2.ReserveResponse:
        """A real reservation on the decode server (recorded for abort_all)."""
        request_id = request_id_for(rng)
        self.granted.add(request_id)
        return await decode_pb2_grpc.DecodeWorkerStub(self.decode_channel()).Reserve(decode_pb2.ReserveRequest(
            request_id=request_id, prompt_tokens=prompt_tokens, max_tokens=4, n=1, lease_ms=lease_ms), timeout=30)

    async def abort(self, request_id: str) -> None:
        """WorkerControl.Abort on the decode server."""
        await worker_pb2_grpc.WorkerControlStub(self.decode_channel()).Abort(
            worker_pb2.WorkerAbortRequest(request_id=request_id), timeout=30)

    async def release(self, request_ids: set[str]) -> None:
        """Abort these request ids on the decode server and forget them."""
        for request_id in request_ids:
            await self.abort(request_id)
            self.granted.discard(request_id)

    async def abort_all(self) -> None:
        """Abort every recorded request id on the decode server."""
        for request_id in sorted(self.granted):
            await self.abort(request_id)
        self.granted.clear()

    async def close(self) -> None:
        """Close the decode channel (before the event loop ends)."""
        if self._channel is not None:
            await self._channel[1].close()
            self._channel = None


def request_id_for(rng: random.Random) -> str:
    return f"fz{rng.getrandbits(40):010x}"


def token_ids(rng: random.Random, low: int = 1, high: int = 40) -> list[int]:
    return [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(low, high))]


def public_sampling(rng: random.Random) -> router_pb2.SamplingParams:
    params = router_pb2.SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0.0, 0.7, 1.0]),
                                       n=rng.choice([1, 1, 2]), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.3:
        params.seed = rng.getrandbits(63)
        params.top_p, params.top_k, params.min_p = 0.9, 20, 0.05
        params.stop.append(rng.choice(WORDS))
        params.logprobs = rng.randint(0, 3)
    return params


def engine_sampling(rng: random.Random) -> worker_pb2.EngineSamplingParams:
    return worker_pb2.EngineSamplingParams(
        max_tokens=rng.randint(2, 8), temperature=rng.choice([0.0, 1.0]), top_p=1.0, n=1, repetition_penalty=1.0,
        seed=rng.getrandbits(63), return_logprobs=rng.random() < 0.2, ignore_eos=True)


async def generate_request(rng, ctx) -> Message:
    request = router_pb2.GenerateRequest(request_id=request_id_for(rng) if rng.random() < 0.5 else "",
                                         sampling=public_sampling(rng))
    if rng.random() < 0.5:
        request.prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    else:
        request.prompt_token_ids.ids.extend(token_ids(rng))
    return request


async def prefill_request(rng, ctx) -> Message:
    prompt = token_ids(rng)
    blocks = -(-len(prompt) // 16)
    if rng.random() < 0.05:  # a real reservation: the mutation may reach a real transfer
        reservation = await ctx.reserve(rng, len(prompt))
        target = prefill_pb2.KvTarget(kv_endpoint=reservation.kv_endpoint, reservation_id=reservation.reservation_id,
                                      block_ids=reservation.block_ids)
    else:
        target = prefill_pb2.KvTarget(kv_endpoint=ctx.kv_endpoint, reservation_id=request_id_for(rng) + "/0",
                                      block_ids=list(range(blocks)))
    return prefill_pb2.PrefillRequest(request_id=request_id_for(rng), prompt_token_ids=prompt,
                                      sampling=engine_sampling(rng), kv_target=target)


async def reserve_request(rng, ctx) -> Message:
    return decode_pb2.ReserveRequest(request_id=request_id_for(rng), prompt_tokens=rng.randint(1, 100),
                                     max_tokens=rng.randint(1, 8), n=rng.choice([1, 2]),
                                     lease_ms=rng.choice([0, 1000, 3000]))


async def abort_granted(ctx, reply: bytes) -> None:
    """After a fuzzed Reserve is granted: abort it (its request id is the reservation id's head)."""
    await ctx.release({decode_pb2.ReserveResponse.FromString(reply).reservation_id.rsplit("/", 1)[0]})


async def decode_request(rng, ctx) -> Message:
    prompt = token_ids(rng)
    request = decode_pb2.DecodeRequest(
        request_id=request_id_for(rng), prompt_token_ids=prompt, sampling=engine_sampling(rng),
        samples=[worker_pb2.SampleProgress(index=0, generated_token_ids=token_ids(rng, 1, 3))])
    roll = rng.random()
    if roll < 0.005:  # a real reservation whose KV never comes: the wait ends with its 1 s lease
        reservation = await ctx.reserve(rng, len(prompt), lease_ms=1000)
        request.reservation_id = reservation.reservation_id
        request.request_id = reservation.reservation_id.rsplit("/", 1)[0]
    elif roll < 0.5:
        request.reservation_id = request.request_id + "/0"
    return request


async def colocated_request(rng, ctx) -> Message:
    request = colocated_pb2.WorkerGenerateRequest(request_id=request_id_for(rng), prompt_token_ids=token_ids(rng),
                                                  sampling=engine_sampling(rng))
    if rng.random() < 0.3:  # a continuation after a failover
        request.samples.add(index=0, generated_token_ids=token_ids(rng, 1, 3))
    return request


def constant(message: Message) -> Callable[[random.Random, FuzzContext], Awaitable[Message]]:
    async def seed(rng, ctx) -> Message:
        return message
    return seed


async def abort_request(rng, ctx) -> Message:
    return worker_pb2.WorkerAbortRequest(request_id=request_id_for(rng))


async def health_request(rng, ctx) -> Message:
    return health_pb2.HealthCheckRequest(service=rng.choice(["", "pdserve.v1.Router", "pdserve.v1.DecodeWorker",
                                                             "nope"]))


@dataclass(frozen=True)
class Method:
    """A method's full path, whether it streams, a valid request, what to do with a unary
    reply, and how deep to read a stream."""

    path: str
    streaming: bool
    seed: Callable[[random.Random, FuzzContext], Awaitable[Message]]
    after: Callable[[FuzzContext, bytes], Awaitable[None]] | None = None
    reads: int = 2  # a stream is read this many messages deep, then cancelled


@dataclass(frozen=True)
class Service:
    """A gRPC service: its methods and the servers (addresses) that serve it."""

    methods: list[Method]
    addresses: Callable[[FuzzContext], list[str]]


def _workers(ctx: FuzzContext) -> list[str]:
    return [ctx.prefill, ctx.decode, ctx.colocated]


SERVICES = {
    "Router": Service([
        Method("/pdserve.v1.Router/Generate", True, generate_request),
        Method("/pdserve.v1.Router/Abort", False, constant(router_pb2.AbortRequest(request_id="fz-unknown"))),
        Method("/pdserve.v1.Router/Tokenize", False, constant(router_pb2.TokenizeRequest(text="hello world"))),
        Method("/pdserve.v1.Router/GetModelInfo", False, constant(router_pb2.GetModelInfoRequest())),
    ], lambda ctx: [ctx.router]),
    "PrefillWorker": Service([Method("/pdserve.v1.PrefillWorker/Prefill", False, prefill_request)],
                             lambda ctx: [ctx.prefill]),
    "DecodeWorker": Service([
        Method("/pdserve.v1.DecodeWorker/Reserve", False, reserve_request, abort_granted),
        Method("/pdserve.v1.DecodeWorker/Decode", True, decode_request),
    ], lambda ctx: [ctx.decode]),
    "ColocatedWorker": Service([Method("/pdserve.v1.ColocatedWorker/Generate", True, colocated_request)],
                               lambda ctx: [ctx.colocated]),
    "WorkerControl": Service([
        Method("/pdserve.v1.WorkerControl/Abort", False, abort_request),
        Method("/pdserve.v1.WorkerControl/GetLoad", False, constant(worker_pb2.GetLoadRequest())),
        Method("/pdserve.v1.WorkerControl/GetWorkerInfo", False, constant(worker_pb2.GetWorkerInfoRequest())),
    ], _workers),
    "Health": Service([
        Method("/grpc.health.v1.Health/Check", False, health_request),
        Method("/grpc.health.v1.Health/Watch", True, health_request, reads=1),  # it sends on changes only
    ], lambda ctx: [ctx.router, *_workers(ctx)]),
}
