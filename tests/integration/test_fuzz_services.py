"""Fuzzing a real cluster (1 prefill + 1 decode + 1 colocated worker + router): random bytes and
byte- and field-level mutations of valid requests to every method of every public and internal
gRPC service (Router, PrefillWorker, DecodeWorker, WorkerControl, ColocatedWorker, Health), sent
raw through generic channel methods, then random and malformed frames to the decode server's KV
transfer port. No call may end INTERNAL, UNKNOWN (an unmapped exception) or past its deadline (a
hang); after each service every process is alive and every KV block is free again (well before a
lease could free it), and at the end a greedy request returns the tokens it returned before.

PDSERVE_FUZZ_COUNT sets the messages per service (and KV connections); the default fits CI,
the acceptance run uses 10000 (README "Bad input" has its figures). PDSERVE_FUZZ_SEED replays
a run's messages."""

from __future__ import annotations

import asyncio
import collections
import os
import random

import grpc
import pytest

from helpers.bad_input_testing import assert_all_alive, log_tails, reference_tokens, start_cluster, wait_nothing_held
from helpers.fuzz_kv import fuzz_kv_connection
from helpers.fuzz_messages import fuzz_payload
from helpers.fuzz_seeds import SERVICES, FuzzContext, Method
from helpers.secure_switch import secure_requested
from pdserve.kvtransfer import KVLayout
from pdserve.models.config import ModelConfig
from pdserve.models.tiny_model import make_tiny_model

FUZZ_COUNT = int(os.environ.get("PDSERVE_FUZZ_COUNT", "2000"))
FUZZ_SEED = int(os.environ.get("PDSERVE_FUZZ_SEED", "8"))
CONCURRENCY = 32
CALL_DEADLINE_S = 30.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
# Well within the reservations' 30 s default lease: a block that only its lease's expiry frees is a leak.
FREED_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(the running cluster, a greedy request's tokens before fuzzing, the FuzzContext)."""
    model = make_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny", arch="llama", seed=0)
    running = start_cluster(str(model), colocated=1)
    try:
        decode = running.servers("decode")[0]
        config = ModelConfig.from_dir(model)
        layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, 16, config.torch_dtype)
        ctx = FuzzContext(running.router_address, running.servers("prefill")[0].address, decode.address,
                          decode.kv_endpoint, running.servers("colocated")[0].address, layout,
                          running.client_security())
        yield running, reference_tokens(running.router_address, ctx.security), ctx
    finally:
        running.stop()


async def _send(channel: grpc.aio.Channel, method: Method, payload: bytes) -> tuple[grpc.StatusCode, bytes | None]:
    """One raw call: (status code, the unary reply's bytes). A stream is read method.reads
    messages deep, then cancelled (a stream still open then counts as OK)."""
    try:
        if not method.streaming:
            return grpc.StatusCode.OK, await channel.unary_unary(method.path)(payload, timeout=CALL_DEADLINE_S)
        call = channel.unary_stream(method.path)(payload, timeout=CALL_DEADLINE_S)
        try:
            for _ in range(method.reads):
                if await call.read() is grpc.aio.EOF:
                    break
        finally:
            call.cancel()
        return grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as error:
        return error.code(), None


async def _fuzz_service(name: str, ctx: FuzzContext, count: int, seed: int) -> tuple[collections.Counter, list]:
    """Send `count` fuzzed calls to the service's methods; (codes by method, forbidden outcomes)."""
    rng = random.Random(f"{seed}-{name}")
    service = SERVICES[name]
    codes: collections.Counter = collections.Counter()
    bad: list = []
    gate = asyncio.Semaphore(CONCURRENCY)
    channels = {address: ctx.security.aio_channel(address, ()) for address in service.addresses(ctx)}

    async def one(method: Method, address: str, kind: str, payload: bytes, reserved: set[str]) -> None:
        async with gate:
            code, reply = await _send(channels[address], method, payload)
            if reply is not None and method.after is not None:
                await method.after(ctx, reply)
            await ctx.release(reserved)  # the seed's reservations, now that the call is over
        codes[method.path.rsplit("/", 1)[1], code.name] += 1
        if code in FORBIDDEN:
            bad.append((method.path, address, kind, code.name, payload[:200].hex()))

    tasks = []
    try:
        for _ in range(count):
            method = rng.choice(service.methods)
            held = set(ctx.granted)
            kind, payload = fuzz_payload(rng, await method.seed(rng, ctx))
            tasks.append(asyncio.ensure_future(one(method, rng.choice(service.addresses(ctx)), kind, payload,
                                                   ctx.granted - held)))
            if len(tasks) >= 4 * CONCURRENCY:  # bounded memory: wait for the oldest batch
                await asyncio.gather(*tasks[:CONCURRENCY])
                del tasks[:CONCURRENCY]
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels.values():
            await channel.close()
        await ctx.close()
    return codes, bad


def _assert_nothing_leaked(running, ctx: FuzzContext) -> None:
    """Every process alive and, once the reservations the fuzz was granted are aborted, every
    worker's KV blocks free with no request left, well before any lease could expire."""
    async def abort_granted():
        await ctx.abort_all()
        await ctx.close()
    asyncio.run(abort_granted())
    assert_all_alive(running)
    wait_nothing_held(running, timeout_s=FREED_WITHIN_S)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_fuzzed_calls_never_crash_hang_fail_internally_or_leak(cluster, service):
    running, _, ctx = cluster
    codes, bad = asyncio.run(_fuzz_service(service, ctx, FUZZ_COUNT, FUZZ_SEED))
    print(f"\n{service}: {FUZZ_COUNT} calls: {dict(sorted(codes.items()))}")
    assert not bad, f"{len(bad)} forbidden outcomes, first: {bad[:5]}\n{log_tails(running)}"
    assert sum(codes.values()) == FUZZ_COUNT
    _assert_nothing_leaked(running, ctx)


async def _fuzz_kv_port(ctx: FuzzContext, count: int, seed: int) -> collections.Counter:
    rng = random.Random(f"{seed}-kv")
    seeds = [rng.getrandbits(64) for _ in range(count)]  # one generator per connection: replayable
    gate = asyncio.Semaphore(16)
    outcomes: collections.Counter = collections.Counter()

    async def one(i: int) -> None:
        async with gate:
            outcomes[await fuzz_kv_connection(random.Random(seeds[i]), ctx)] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await ctx.close()
    return outcomes


@pytest.mark.skipif(secure_requested(), reason="PDSERVE_TEST_SECURE: these frames go in plaintext without the KV "
                                               "token (refusing such senders is tested in test_security.py)")
def test_random_and_malformed_frames_on_the_kv_port(cluster):
    running, _, ctx = cluster
    outcomes = asyncio.run(_fuzz_kv_port(ctx, FUZZ_COUNT, FUZZ_SEED))
    print(f"\nKV port: {FUZZ_COUNT} connections: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) == FUZZ_COUNT
    assert not [o for o in outcomes if o.endswith("no-answer")], outcomes  # each was answered or closed
    _assert_nothing_leaked(running, ctx)


def test_after_fuzzing_a_greedy_request_returns_the_same_tokens(cluster):
    running, reference, ctx = cluster
    _assert_nothing_leaked(running, ctx)
    assert reference_tokens(running.router_address, ctx.security) == reference, log_tails(running)
