"""Redis loss with a real cluster (router, prefill and decode processes, embedded valkey): Redis
restarting empty mid-stream, and Redis down for a while.

- Streams in flight go on, with the same tokens as a fault-free run, and rewrite their records
  (prompt, every token sent, finish reasons) in the new Redis, every key with a TTL; workers
  re-register on their next heartbeat and new requests succeed.
- While Redis is down a new request waits up to --redis-wait-s, then fails with UNAVAILABLE
  naming Redis; once Redis is back requests succeed again.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
import torch

from helpers.observability_testing import generate, request_for
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.state.key_audit import keys_without_ttl
from pdserve.state.redis_connect import redact_url
from pdserve.state.registry import WorkerRegistry
from pdserve.state.request_store import RequestStore
from pdserve.v1 import router_pb2_grpc

NUM_STREAMS = 4
MAX_TOKENS = 400
REDIS_WAIT_S = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("redisloss") / "tiny", arch="llama", seed=0)
    with LocalCluster(str(model), prefill=1, decode=1,
                      extra_args=["--redis-wait-s", str(REDIS_WAIT_S)]) as running:
        yield running


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(23)
    return [torch.randint(2, 300, (int(torch.randint(4, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(NUM_STREAMS)]


def greedy(prompt: list[int], request_id: str):
    return request_for(prompt, MAX_TOKENS, request_id, temperature=0.0)


@pytest.fixture(scope="module")
def reference(cluster, prompts) -> list[list[int]]:
    """The fault-free run's tokens (its records stay in Redis until the restart empties it)."""
    async def run():
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(generate(stub, greedy(p, f"ref-{i}")) for i, p in enumerate(prompts)))

    results = asyncio.run(run())
    assert all(r.error is None and len(r.token_ids) == MAX_TOKENS for r in results), results
    return [r.token_ids for r in results]


async def until(condition, what: str, timeout_s: float = 20.0) -> None:
    """Await condition() (a coroutine function) holding; other processes act meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        assert loop.time() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


async def workers_registered(registry: WorkerRegistry) -> bool:
    return bool(await registry.list("prefill")) and bool(await registry.list("decode"))


def restart_redis_empty(cluster: LocalCluster) -> None:
    """Stop the cluster's Redis (by its pid) and start a fresh, empty one on the same port."""
    cluster.redis.stop_process()
    cluster.redis.start()


def test_streams_survive_redis_restarting_empty_and_rewrite_their_records(cluster, prompts, reference):
    async def scenario():
        redis = aioredis.from_url(cluster.redis_url)
        store = RequestStore(redis, prefix=cluster.prefix)
        registry = WorkerRegistry(redis, prefix=cluster.prefix)
        assert await store.get("ref-0") is not None
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            progress = [0] * NUM_STREAMS
            streams = [asyncio.create_task(generate(stub, greedy(p, f"live-{i}"),
                                                    on_chunk=lambda n, i=i: progress.__setitem__(i, n)))
                       for i, p in enumerate(prompts)]

            async def all_streaming():
                return min(progress) >= 8
            await until(all_streaming, "every stream to be past its first tokens")
            await asyncio.to_thread(restart_redis_empty, cluster)
            assert max(progress) < MAX_TOKENS, "a stream ended before Redis was back: make MAX_TOKENS larger"
            await redis.connection_pool.disconnect()  # our own connections died with the old server
            assert await store.get("ref-0") is None  # the new Redis started empty
            results = await asyncio.gather(*streams)

        for result, want in zip(results, reference):
            assert result.error is None and result.finish_reasons == ["length"]
            assert result.token_ids == want

        async def records_whole():  # the router writes the last tokens as the streams end
            records = [await store.get(f"live-{i}") for i in range(NUM_STREAMS)]
            return all(r is not None and r.finished == ["length"] and len(r.sent_tokens[0]) == MAX_TOKENS
                       for r in records)
        await until(records_whole, "the streams' records to be rewritten whole")
        for i, (prompt, want) in enumerate(zip(prompts, reference)):
            record = await store.get(f"live-{i}")
            assert record.prompt_token_ids == prompt and record.sent_tokens == [want]
            assert record.params["max_tokens"] == MAX_TOKENS and record.params["n"] == 1

        await until(lambda: workers_registered(registry), "the workers to re-register", timeout_s=10)
        async with cluster.aio_channel(cluster.router_address) as channel:
            fresh = await generate(router_pb2_grpc.RouterStub(channel), greedy(prompts[0], "after-restart"))
        assert fresh.error is None and fresh.token_ids == reference[0]
        await assert_every_key_has_a_ttl(redis, cluster.prefix)
        await redis.aclose()

    asyncio.run(scenario())


async def assert_every_key_has_a_ttl(redis, prefix: str) -> None:
    assert await keys_without_ttl(redis, prefix) == []
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    assert keys
    assert all([await redis.ttl(k) > 0 for k in keys])


def test_requests_fail_unavailable_while_redis_is_down_and_succeed_once_it_is_back(cluster, prompts, reference):
    async def request(request_id: str):
        async with cluster.aio_channel(cluster.router_address) as channel:
            return await generate(router_pb2_grpc.RouterStub(channel), greedy(prompts[1], request_id))

    async def scenario():
        cluster.redis.stop_process(kill=True)
        started = time.monotonic()
        refused = await request("while-down")
        elapsed = time.monotonic() - started
        assert refused.token_ids == []
        assert refused.error.startswith(f"UNAVAILABLE: Redis at {redact_url(cluster.redis_url)} "
                                        f"unreachable for {REDIS_WAIT_S:.1f} s: "), refused.error
        assert REDIS_WAIT_S <= elapsed < REDIS_WAIT_S + 2.5, elapsed

        await asyncio.to_thread(cluster.redis.start)
        redis = aioredis.from_url(cluster.redis_url)
        await until(lambda: workers_registered(WorkerRegistry(redis, prefix=cluster.prefix)),
                    "the workers to re-register", timeout_s=10)
        served = await request("after-outage")
        assert served.error is None and served.token_ids == reference[1]
        await assert_every_key_has_a_ttl(redis, cluster.prefix)
        await redis.aclose()

    asyncio.run(scenario())
