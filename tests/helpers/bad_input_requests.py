"""What the bad-input table sends: its Env (addresses, stubs, cleanups) and the requests that
need the cluster's state first (a running request, real reservations, a silent or incompatible
KV peer)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import torch

from pdserve.cli.cluster_security import ClusterSecurity
from pdserve.kvtransfer import KVLayout, TCPKVReceiver
from pdserve.runtime.channels import PLAINTEXT
from pdserve.runtime.tls import TlsConfig
from pdserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

Code = grpc.StatusCode
SP = router_pb2.SamplingParams
TOKENS = [5, 6, 7, 8, 9]
HUGE_LIST = 5_000_000  # the adversarial probe's stop_token_ids: a 17 MB Redis record before the limit
# What a request id would make of the router's log, were it written raw: a line of its own.
FORGED_LOG_LINE = "2030-01-01 00:00:00,000 pdserve.router INFO FORGED"
LOG_FORGING_IDS = {"newline": f"ok\n{FORGED_LOG_LINE}", "carriage-return": f"ok\r{FORGED_LOG_LINE}",
                   "crlf": f"ok\r\n{FORGED_LOG_LINE}", "escape-sequence": f"ok\x1b[2K\r{FORGED_LOG_LINE}",
                   "next-line": f"ok\x85{FORGED_LOG_LINE}", "line-separator": f"ok\u2028{FORGED_LOG_LINE}"}


@dataclass
class Env:
    """What a case's request factory may use: addresses, stubs, and things to undo afterwards;
    security: the cluster's credentials when it is secured (PDSERVE_TEST_SECURE)."""

    router: str
    prefill: str
    decode: str
    kv_endpoint: str
    security: ClusterSecurity | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    background: list[asyncio.Task] = field(default_factory=list)
    cleanups: list[Callable[[], Awaitable]] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel that may send more than the servers accept (for the huge-message case)."""
        client = self.security.client() if self.security else PLAINTEXT
        ch = client.aio_channel(address, [("grpc.max_send_message_length", -1)])
        self.channels.append(ch)
        return ch

    def kv_receiver_credentials(self) -> dict:
        """TCPKVReceiver arguments that let the cluster's prefill servers send to it (TLS and
        the KV token when the cluster is secured; none when not)."""
        if self.security is None:
            return {}
        tls = TlsConfig(self.security.cert_file, self.security.key_file, self.security.ca_file)
        return {"ssl_context": tls.kv_server_context(), "auth_token": self.security.kv_auth_token}

    async def reserve(self, request_id: str, prompt_tokens: int, lease_ms: int = 5000) -> decode_pb2.ReserveResponse:
        """A real reservation on the decode server, aborted when the case ends."""
        stub = decode_pb2_grpc.DecodeWorkerStub(self.channel(self.decode))
        self.cleanups.append(lambda: self.abort_on_decode(request_id))
        return await stub.Reserve(decode_pb2.ReserveRequest(request_id=request_id, prompt_tokens=prompt_tokens,
                                                            max_tokens=4, n=1, lease_ms=lease_ms), timeout=10)

    async def abort_on_decode(self, request_id: str) -> None:
        """WorkerControl.Abort on the decode server."""
        stub = worker_pb2_grpc.WorkerControlStub(self.channel(self.decode))
        await stub.Abort(worker_pb2.WorkerAbortRequest(request_id=request_id), timeout=10)


def engine_params(**overrides) -> worker_pb2.EngineSamplingParams:
    """Valid resolved sampling parameters with some fields replaced."""
    fields_ = dict(max_tokens=4, temperature=0.0, top_p=1.0, n=1, repetition_penalty=1.0, seed=1)
    return worker_pb2.EngineSamplingParams(**{**fields_, **overrides})


def generate(sampling: SP | None = None, **fields_) -> router_pb2.GenerateRequest:
    """A GenerateRequest (prompt "hello" unless another input is given)."""
    if "prompt" not in fields_ and "prompt_token_ids" not in fields_ and not fields_.pop("no_input", False):
        fields_["prompt"] = "hello"
    return router_pb2.GenerateRequest(sampling=sampling, **fields_)


def token_ids(ids) -> router_pb2.TokenIds:
    return router_pb2.TokenIds(ids=ids)


async def huge_stop_token_ids(env: Env) -> router_pb2.GenerateRequest:
    """HUGE_LIST stop token ids (built when the case runs, not at collection)."""
    return generate(SP(stop_token_ids=[7] * HUGE_LIST), request_id="huge-stop-token-ids")


async def huge_token_prompt(env: Env) -> router_pb2.GenerateRequest:
    """A prompt of HUGE_LIST token ids, each inside the vocabulary."""
    return generate(prompt_token_ids=token_ids([7] * HUGE_LIST), request_id="huge-token-prompt")


def sample(index: int = 0, tokens=(3,)) -> worker_pb2.SampleProgress:
    return worker_pb2.SampleProgress(index=index, generated_token_ids=list(tokens))


# ----- requests that need the cluster's state ------------------------------------------------

async def duplicate_request_id(env: Env) -> router_pb2.GenerateRequest:
    """A long request named "dup-id" is streaming; a second one with its id arrives."""
    call = router_pb2_grpc.RouterStub(env.channel(env.router)).Generate(
        generate(SP(max_tokens=200, ignore_eos=True), request_id="dup-id"), timeout=60)
    await call.read()  # the first chunk: the request is running

    async def finish():
        call.cancel()
    env.cleanups.append(finish)
    return generate(SP(max_tokens=4), request_id="dup-id")


async def reservation_hog(env: Env) -> decode_pb2.ReserveRequest:
    """Reservations hold nearly every free block; one more cannot get its 15 blocks now."""
    stub = worker_pb2_grpc.WorkerControlStub(env.channel(env.decode))
    free = (await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)).num_blocks_free
    for _ in range(free // 15):
        await env.reserve("hog", 240)
    env.cleanups.append(lambda: env.abort_on_decode("hog-more"))  # in case it were granted
    return decode_pb2.ReserveRequest(request_id="hog-more", prompt_tokens=240, max_tokens=4, n=1)


async def decode_of_other_request(env: Env) -> decode_pb2.DecodeRequest:
    reservation = await env.reserve("owner", 5)
    return decode_pb2.DecodeRequest(request_id="intruder", reservation_id=reservation.reservation_id,
                                    prompt_token_ids=TOKENS, samples=[sample()], sampling=engine_params())


async def decode_prompt_not_the_reserved_one(env: Env) -> decode_pb2.DecodeRequest:
    reservation = await env.reserve("short", 10)
    return decode_pb2.DecodeRequest(request_id="short", reservation_id=reservation.reservation_id,
                                    prompt_token_ids=TOKENS, samples=[sample()], sampling=engine_params())


async def decode_without_first_token(env: Env) -> decode_pb2.DecodeRequest:
    reservation = await env.reserve("nofirst", 5)
    return decode_pb2.DecodeRequest(request_id="nofirst", reservation_id=reservation.reservation_id,
                                    prompt_token_ids=TOKENS, samples=[sample(tokens=())], sampling=engine_params())


def prefill(target: prefill_pb2.KvTarget | None, request_id: str = "p", prompt=TOKENS,
            sampling: worker_pb2.EngineSamplingParams | None = None) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                      sampling=sampling or engine_params(), kv_target=target)


async def prefill_too_few_blocks(env: Env) -> prefill_pb2.PrefillRequest:
    reservation = await env.reserve("fewblocks", 40)
    return prefill(prefill_pb2.KvTarget(kv_endpoint=reservation.kv_endpoint, reservation_id=reservation.reservation_id,
                                        block_ids=reservation.block_ids[:1]), "fewblocks", list(range(2, 42)))


async def prefill_other_blocks(env: Env) -> prefill_pb2.PrefillRequest:
    reservation = await env.reserve("otherblocks", 5)
    block = reservation.block_ids[0]
    return prefill(prefill_pb2.KvTarget(kv_endpoint=reservation.kv_endpoint, reservation_id=reservation.reservation_id,
                                        block_ids=[block - 1 if block else block + 1]), "otherblocks")


async def prefill_unknown_reservation(env: Env) -> prefill_pb2.PrefillRequest:
    return prefill(prefill_pb2.KvTarget(kv_endpoint=env.kv_endpoint, reservation_id="never-made", block_ids=[1]))


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


async def prefill_refused_endpoint(env: Env) -> prefill_pb2.PrefillRequest:
    closed = _listener()
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there any more
    return prefill(prefill_pb2.KvTarget(kv_endpoint=f"127.0.0.1:{port}", reservation_id="r", block_ids=[1]))


async def prefill_silent_endpoint(env: Env) -> prefill_pb2.PrefillRequest:
    """A peer that accepts the connection (the kernel does) and never answers the handshake."""
    silent = _listener()
    env.closers.append(silent.close)
    port = silent.getsockname()[1]
    return prefill(prefill_pb2.KvTarget(kv_endpoint=f"127.0.0.1:{port}", reservation_id="r", block_ids=[1]), "silent")


async def prefill_duplicate_request_id(env: Env) -> prefill_pb2.PrefillRequest:
    """A Prefill named "dup-p" waits 2 s on a silent peer; a second one with its id arrives.
    Until the first has reached the server, the second is just a Prefill of an unknown
    reservation (NOT_FOUND at once), or it is the one there first (then the first is refused
    and sent again): send it until the server reports the duplicate."""
    first = await prefill_silent_endpoint(env)
    first.request_id = "dup-p"
    stub = prefill_pb2_grpc.PrefillWorkerStub(env.channel(env.prefill))
    second = prefill(prefill_pb2.KvTarget(kv_endpoint=env.kv_endpoint, reservation_id="r", block_ids=[1]), "dup-p")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not env.background or env.background[-1].done():
            env.background.append(asyncio.ensure_future(stub.Prefill(first, timeout=30)))
        try:
            await stub.Prefill(second, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() == Code.ALREADY_EXISTS:
                return second
    raise AssertionError("no duplicate Prefill seen in 10 s")


async def prefill_incompatible_layout(env: Env) -> prefill_pb2.PrefillRequest:
    """A KV receiver whose cache has another layout (1 layer, 1 head of 8, blocks of 8)."""
    caches = [(torch.zeros(4, 8, 1, 8), torch.zeros(4, 8, 1, 8))]
    receiver = TCPKVReceiver(caches, KVLayout.from_kv_caches(caches), **env.kv_receiver_credentials())
    endpoint = receiver.start()
    env.closers.append(receiver.stop)
    return prefill(prefill_pb2.KvTarget(kv_endpoint=endpoint, reservation_id="r", block_ids=[1]))
