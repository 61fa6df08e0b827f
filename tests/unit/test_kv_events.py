"""KV cache events for --routing kv (pdserve.state.kv_events): the block pool's event log, the keys a
prompt's blocks have in a worker's cache, the publisher and the router's index over a real
Redis-protocol server, and the prefill choice by cache against load."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from helpers.engine_testing import greedy, load_tiny, one_torch_thread
from pdserve.engine.block_pool import BlockPool
from pdserve.router.worker_choice import CacheAwareChoice, InFlight, choose_decode, choose_prefill
from pdserve.settings import RoutingWeights
from pdserve.state.embedded_redis import EmbeddedRedis
from pdserve.state.kv_events import KVEventPublisher, PrefixIndex, prompt_block_keys
from pdserve.state.registry import WorkerInfo, WorkerLoad


def test_the_pool_logs_entries_stored_and_evicted_in_order_once_recording():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, 11, 0, (1, 2))
    assert pool.drain_events() == []  # not recording yet
    pool.record_events()
    pool.register(b, 22, 0, (3, 4))
    pool.free([a, b])
    (c,) = pool.allocate(1)  # evicts the queue's head: a (cached blocks go to the tail, a first)
    assert c is a and pool.drain_events() == [(True, 22), (False, 11)]
    assert pool.drain_events() == []
    assert sorted(pool.cached_keys()) == [22]


def test_prompt_block_keys_are_the_keys_the_engine_caches(tmp_path):
    with one_torch_thread():
        tiny = load_tiny(tmp_path / "tiny")
        engine = tiny.engine()  # block size 16
        prompt = list(range(5, 5 + 50))  # 3 full blocks and 2 tokens
        engine.generate([prompt], greedy(1))
    keys = prompt_block_keys(prompt, 16)
    assert len(keys) == 3 and set(keys) <= set(engine.pool.cached_keys())


def test_the_index_applies_snapshots_and_events_in_order():
    index = PrefixIndex(None, "p")
    prompt = list(range(100, 164))
    keys = prompt_block_keys(prompt, 16)
    index.apply("w1", 16, "snapshot", keys[:2])
    assert index.cached_tokens("w1", prompt) == 32 and index.cached_tokens("w2", prompt) == 0
    index.apply("w1", 16, "events", [[1, keys[2]], [0, keys[0]]])
    assert index.cached_tokens("w1", prompt) == 0  # the first block is gone: nothing leads
    index.apply("w1", 16, "events", [[1, keys[0]]])
    assert index.cached_tokens("w1", prompt) == 48
    index.apply("w1", 16, "snapshot", [])  # a restarted worker
    assert index.cached_tokens("w1", prompt) == 0


def test_the_index_forgets_workers_that_went_silent():
    index = PrefixIndex(None, "p", forget_after_s=60)
    index.apply("gone", 16, "snapshot", [1, 2, 3])
    index.apply("alive", 16, "snapshot", [4])
    heard = index.workers["gone"].heard_at
    index.apply("alive", 16, "events", [[1, 5]])
    index.workers["alive"].heard_at = heard + 50  # it spoke 50 s after the other
    assert index.forget_silent_workers(now=heard + 61) == ["gone"]
    assert index.blocks_by_worker() == {"alive": 2}


def worker(worker_id: str, queued: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id, "prefill", f"{worker_id}:1", load=WorkerLoad(queued_prompt_tokens=queued))


def test_the_prefill_choice_follows_the_cache_until_its_queue_outweighs_it():
    index = PrefixIndex(None, "p")
    prompt = list(range(200, 200 + 512))
    index.apply("b", 16, "snapshot", prompt_block_keys(prompt, 16))
    idle = [worker("a"), worker("b")]
    assert choose_prefill(idle, InFlight()).worker_id == "a"  # load alone: the first idle one
    choice = CacheAwareChoice(index, prompt)
    assert choice.prefill(idle, InFlight()).worker_id == "b"
    assert (choice.reason, choice.expected_cached_tokens) == ("cache", 512)
    assert choice.weights.prefill_queue_weight == 0.5  # the default: a queued token counts half a token to compute
    busy_b = [worker("a"), worker("b", queued=1000)]  # 1000 queued (500 weighted) < 511 saved: still b
    assert choice.prefill(busy_b, InFlight()).worker_id == "b"
    saturated_b = [worker("a"), worker("b", queued=1100)]  # the hot prefix's holder is swamped: a
    assert choice.prefill(saturated_b, InFlight()).worker_id == "a"
    assert (choice.reason, choice.expected_cached_tokens) == ("load_over_cache", 0)
    assert CacheAwareChoice(index, [1] * 64).prefill(idle, InFlight()).worker_id == "a"  # nobody holds it
    inflight = InFlight()
    for _ in range(3):  # what the router sent since the last heartbeat counts as queued too
        inflight.add("b", 400)
    assert choice.prefill(idle, inflight).worker_id == "a"


def decode_worker(worker_id: str, running: int = 0, free: int = 100, total: int = 100) -> WorkerInfo:
    return WorkerInfo(worker_id, "decode", f"{worker_id}:1",
                      load=WorkerLoad(running=running, free_blocks=free, total_blocks=total))


def test_the_decode_choice_follows_the_cache_until_running_sequences_or_a_full_cache_outweigh_it():
    index = PrefixIndex(None, "p")
    prompt = list(range(1000, 1000 + 1024))
    index.apply("d1", 16, "snapshot", prompt_block_keys(prompt[:768], 16))  # holds 768 of 1024 tokens
    weights = RoutingWeights(decode_running_weight=256.0)
    choice = CacheAwareChoice(index, prompt, weights)
    assert choose_decode([decode_worker("d0"), decode_worker("d1")], InFlight()).worker_id == "d0"  # load alone
    assert choice.decode([decode_worker("d0"), decode_worker("d1")], InFlight()).worker_id == "d1"
    assert (choice.reason, choice.expected_cached_tokens) == ("cache", 768)
    # 2 more running sequences (512 tokens' worth) < 768 tokens not sent: still d1; 3 more: d0
    assert choice.decode([decode_worker("d0"), decode_worker("d1", running=2)], InFlight()).worker_id == "d1"
    assert choice.decode([decode_worker("d0"), decode_worker("d1", running=3)], InFlight()).worker_id == "d0"
    assert choice.reason == "load_over_cache"
    # with a running sequence d1 still wins by its cache, unless its KV blocks are all but taken
    assert choice.decode([decode_worker("d0"), decode_worker("d1", running=1, free=50)], InFlight()).worker_id == "d1"
    assert choice.decode([decode_worker("d0"), decode_worker("d1", running=1, free=5)], InFlight()).worker_id == "d0"
    assert (choice.reason, choice.expected_cached_tokens) == ("load", 0)  # d1's credit was taken back
    index.apply("d0", 16, "snapshot", prompt_block_keys(prompt[:768], 16))  # both hold the same: load decides
    assert choice.decode([decode_worker("d0", running=1), decode_worker("d1")], InFlight()).worker_id == "d1"
    assert choice.reason == "load"



def test_published_events_reach_a_router_that_starts_late():
    async def scenario(url: str) -> None:
        redis = aioredis.from_url(url)
        try:
            pool = BlockPool(4)
            publisher = KVEventPublisher(redis, "t", "prefill-x", "prefill", 16, pool, interval_s=1.0, snapshot_every=3)
            prompt = list(range(300, 348))
            keys = prompt_block_keys(prompt, 16)
            blocks = pool.allocate(3)
            for block, key in zip(blocks[:2], keys):
                pool.register(block, key, 0, (0,))
            await publisher.publish_once()  # events and the first snapshot
            pool.register(blocks[2], keys[2], 0, (0,))
            await publisher.publish_once()  # one event
            assert 0 < await redis.pttl("t:kv-events") <= 30_000  # expires with the last publisher
            index = PrefixIndex(redis, "t")  # starts after both: reads what the stream retains
            while await index.read_once(block_ms=100):
                pass
            assert index.cached_tokens("prefill-x", prompt) == 48
            await redis.xadd("t:kv-events", {"worker": "prefill-x", "block_size": 16, "kind": "events",
                                              "data": "not json"})
            await index.read_once(block_ms=100)  # a malformed entry is skipped, the index kept
            assert index.cached_tokens("prefill-x", prompt) == 48
        finally:
            await redis.aclose()

    with EmbeddedRedis() as server:
        asyncio.run(scenario(server.url))


def test_the_publisher_refuses_a_period_it_cannot_keep():
    with pytest.raises(ValueError, match="interval_s"):
        KVEventPublisher(None, "p", "w", "prefill", 16, BlockPool(1), interval_s=0)
