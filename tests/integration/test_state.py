"""Redis state against a real Redis-protocol server (the embedded valkey the project starts)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from pdserve.state.embedded_redis import EmbeddedRedis
from pdserve.state.registry import WorkerInfo, WorkerLoad, WorkerRegistry
from pdserve.state.request_store import RequestStore


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def run(coro):
    return asyncio.run(coro)


def test_registry_lists_live_workers_and_drops_silent_ones(redis_url):
    async def scenario():
        client = aioredis.from_url(redis_url)
        registry = WorkerRegistry(client, prefix="t1", ttl_s=0.3)
        await registry.heartbeat(WorkerInfo("d1", "decode", "127.0.0.1:1", "127.0.0.1:2",
                                            WorkerLoad(free_blocks=7, total_blocks=8)))
        await registry.heartbeat(WorkerInfo("d2", "decode", "127.0.0.1:3"))
        await registry.heartbeat(WorkerInfo("p1", "prefill", "127.0.0.1:4"))
        assert 0 < await client.pttl("t1:workers:prefill") <= 300  # the index expires like its entries
        decode = await registry.list("decode")
        assert [w.worker_id for w in decode] == ["d1", "d2"]
        assert decode[0].load.free_blocks == 7
        await registry.deregister("decode", "d2")
        assert [w.worker_id for w in await registry.list("decode")] == ["d1"]
        # d1 stops heartbeating: Redis expires its key (TTL 0.3 s) and it leaves the list.
        for _ in range(100):
            if not await registry.list("decode"):
                break
            await asyncio.sleep(0.05)
        assert await registry.list("decode") == []
        assert await client.smembers("t1:workers:decode") == set()  # pruned from the index too
        with pytest.raises(ValueError, match="unknown worker role"):
            await registry.heartbeat(WorkerInfo("x", "bogus", "a"))
        await client.aclose()

    run(scenario())


def test_request_store_round_trip_with_ttls(redis_url):
    async def scenario():
        client = aioredis.from_url(redis_url)
        store = RequestStore(client, prefix="t2", ttl_s=60)
        assert await store.create("r1", [1, 2, 3], {"n": 2, "max_tokens": 5}, seed=42)
        assert not await store.create("r1", [9], {"n": 1}, seed=1)  # duplicate id
        await store.append_tokens("r1", 0, [7, 8])
        await store.append_tokens("r1", 1, [5])
        await store.append_tokens("r1", 0, [9])
        await store.finish("r1", 1, "length")
        record = await store.get("r1")
        assert record.prompt_token_ids == [1, 2, 3] and record.seed == 42
        assert record.sent_tokens == [[7, 8, 9], [5]] and record.finished == [None, "length"]
        keys = [k async for k in client.scan_iter(match="t2:*")]
        ttls = [await client.ttl(k) for k in keys]
        assert keys and all(0 < t <= 60 for t in ttls)
        await store.delete("r1", n=2)
        assert await store.get("r1") is None
        await client.aclose()

    run(scenario())


def test_progress_recorder_coalesces_and_survives_redis_loss():
    from helpers.relay_testing import Relay
    from pdserve.router.progress import ProgressRecorder

    async def scenario(server):
        client = aioredis.from_url(server.url)
        store = RequestStore(client, prefix="t3", ttl_s=60)
        assert await store.create("r", [1, 2], {"n": 2}, seed=1)
        recorder = ProgressRecorder(store, "r", [1, 2], {"n": 2}, 1)
        relay = Relay(recorder, 2)
        for i in range(50):
            relay.chunk(i % 2, [i])
        relay.done(1, "stop")
        await recorder.close()
        record = await store.get("r")
        assert record.sent_tokens == [list(range(0, 50, 2)), list(range(1, 50, 2))]
        assert record.finished == [None, "stop"]
        server.stop()  # Redis goes away mid-stream: recording fails quietly, nothing raises
        lost = ProgressRecorder(store, "r", [1, 2], {"n": 2}, 1, close_wait_s=0.2)
        Relay(lost, 2).chunk(0, [99])
        await lost.close()
        await client.aclose()

    server = EmbeddedRedis().start()
    try:
        run(scenario(server))
    finally:
        server.stop()


def test_retries_prefer_live_workers_over_a_dead_one_still_registered(redis_url):
    """Once a request has failed on every worker of a role, its next attempt goes back to the live
    ones, not to a dead one whose registration has not expired yet (a suspect)."""
    from pdserve.router.attempt import Attempt, AttemptRunner
    from pdserve.router.failover import SuspectWorkers
    from pdserve.router.worker_choice import InFlight
    from pdserve.router.worker_clients import WorkerClients

    async def scenario():
        client = aioredis.from_url(redis_url)
        registry = WorkerRegistry(client, prefix="retry-choice", ttl_s=30)
        for worker_id in ("dead", "live"):
            await registry.heartbeat(WorkerInfo(worker_id, "prefill", "127.0.0.1:1"))
        suspects = SuspectWorkers(cooldown_s=60.0)
        suspects.mark("dead")
        runner = AttemptRunner(registry, WorkerClients(), InFlight(), suspects, lease_ms=1000, rpc_timeout_s=1.0,
                               stream_idle_timeout_s=1.0)
        untried = [w.worker_id for w in await runner._workers("prefill", Attempt("r", avoid={"dead"}))]
        all_tried = [w.worker_id for w in await runner._workers("prefill", Attempt("r", avoid={"dead", "live"}))]
        unknown_state = [w.worker_id for w in await runner._workers("prefill", Attempt("r", avoid=set()))]
        suspects.mark("live")  # every worker suspect: the ones this request has not tried
        only_suspects = [w.worker_id for w in await runner._workers("prefill", Attempt("r", avoid={"dead"}))]
        await client.aclose()
        return untried, all_tried, unknown_state, only_suspects

    untried, all_tried, unknown_state, only_suspects = run(scenario())
    assert untried == ["live"] and all_tried == ["live"] and unknown_state == ["live"]
    assert only_suspects == ["live"]
