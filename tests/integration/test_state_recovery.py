"""Redis restarting empty or going away, against a real embedded server: request records are
rewritten whole with TTLs, workers re-register, callers wait up to a deadline then fail clearly."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from helpers.relay_testing import Relay
from pdserve.router.progress import ProgressRecorder
from pdserve.runtime.errors import UnavailableError
from pdserve.state.embedded_redis import EmbeddedRedis
from pdserve.state.key_audit import keys_without_ttl
from pdserve.state.redis_connect import redact_url
from pdserve.state.redis_retry import RedisWait
from pdserve.state.registry import WorkerInfo, WorkerRegistry
from pdserve.state.request_store import RequestRecord, RequestStore

PROMPT = [5, 6, 7]
PARAMS = {"n": 2, "max_tokens": 3000}


def client_for(server: EmbeddedRedis):
    # As the services open it (from_url: no client-side retries, a dead server fails a call at once).
    return aioredis.from_url(server.url)


@pytest.fixture
def server():
    running = EmbeddedRedis().start()
    yield running
    running.stop()


async def assert_every_key_has_a_ttl(client, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    assert keys
    assert await keys_without_ttl(client, prefix) == []
    assert all([await client.ttl(k) > 0 for k in keys])


def test_progress_writes_are_checked_idempotent_and_refused_when_the_record_is_gone(server):
    async def scenario():
        client = client_for(server)
        store = RequestStore(client, prefix="p", ttl_s=60)
        assert await store.create("r", PROMPT, PARAMS, seed=9)
        long = list(range(2500))  # more than one RPUSH chunk
        assert await store.record_progress("r", {0: long}, {}, offsets={0: 0}, n=2)
        # The same write again (a retry that had gone through) changes nothing.
        assert await store.record_progress("r", {0: long}, {}, offsets={0: 0}, n=2)
        # A writer whose idea of the list differs is refused and writes nothing.
        assert not await store.record_progress("r", {0: [1]}, {1: "stop"}, offsets={0: 7}, n=2)
        record = await store.get("r")
        assert record.sent_tokens == [long, []] and record.finished == [None, None]
        # Redis lost the record: the write is refused and creates no key.
        await client.flushall()
        assert not await store.record_progress("r", {0: [1]}, {0: "stop"}, offsets={0: 2500}, n=2)
        assert [k async for k in client.scan_iter(match="p:*")] == []
        with pytest.raises(ValueError, match="sample index 2 out of range"):
            await store.record_progress("r", {2: [1]}, {}, n=2)
        await client.aclose()

    asyncio.run(scenario())


def test_rewrite_restores_the_whole_record_with_ttls(server):
    async def scenario():
        client = client_for(server)
        store = RequestStore(client, prefix="w", ttl_s=60)
        record = RequestRecord("r", PROMPT, PARAMS, 9, [list(range(1200)), [4]], [None, "length"])
        await store.rewrite(record)
        await store.rewrite(record)  # repeatable
        assert await store.get("r") == record
        await assert_every_key_has_a_ttl(client, "w")
        await client.aclose()

    asyncio.run(scenario())


def test_recorder_rewrites_a_record_redis_lost_on_restart(server, caplog):
    async def scenario():
        client = client_for(server)
        store = RequestStore(client, prefix="rec", ttl_s=60)
        assert await store.create("r", PROMPT, PARAMS, seed=9)
        first = ProgressRecorder(store, "r", PROMPT, PARAMS, 9)
        first_relay = Relay(first, 2)
        first_relay.chunk(0, [1, 2])
        first_relay.chunk(1, [3])
        await first.close()
        held = await store.get("r")
        server.stop_process()  # Redis restarts empty on the same port
        server.start()
        # Drop the pooled connections the restart broke, so the next write reaches the new
        # server and finds the record gone (a write on a broken connection fails instead: the
        # next test covers that path).
        await client.connection_pool.disconnect()
        assert await client.dbsize() == 0
        # A second recorder continues the request from what Redis held (as after a failover).
        second = ProgressRecorder(store, "r", PROMPT, PARAMS, 9, resume_from=held)
        second_relay = Relay(second, 2, held.sent_tokens)
        second_relay.chunk(0, [4])
        second_relay.chunk(1, [5, 6])
        second_relay.done(1, "stop")
        second_relay.chunk(0, [7])
        second_relay.done(0, "length")
        await second.close()
        assert second.synced()
        assert "the Redis record of r is gone or differs" in caplog.text  # found missing, not failed
        assert await store.get("r") == RequestRecord("r", PROMPT, PARAMS, 9, [[1, 2, 4, 7], [3, 5, 6]],
                                                     ["length", "stop"])
        await assert_every_key_has_a_ttl(client, "rec")
        await client.aclose()

    asyncio.run(scenario())


def test_recorder_keeps_going_while_redis_is_down_and_writes_everything_when_it_is_back(server):
    async def scenario():
        client = client_for(server)
        store = RequestStore(client, prefix="down", ttl_s=60)
        assert await store.create("r", PROMPT, {"n": 1}, seed=9)
        recorder = ProgressRecorder(store, "r", PROMPT, {"n": 1}, 9, close_wait_s=0.3)
        recorder_relay = Relay(recorder, 1)
        recorder_relay.chunk(0, [1])
        server.stop_process(kill=True)
        recorder_relay.chunk(0, [2, 3])
        recorder_relay.done(0, "stop")
        started = time.monotonic()
        await recorder.close()  # the stream's end does not wait for Redis
        assert time.monotonic() - started < 2.0
        assert not recorder.synced()
        await asyncio.to_thread(server.start)
        await recorder.wait_closed()  # the writer went on retrying in the background
        assert await store.get("r") == RequestRecord("r", PROMPT, {"n": 1}, 9, [[1, 2, 3]], ["stop"])
        await assert_every_key_has_a_ttl(client, "down")
        await client.aclose()

    asyncio.run(scenario())


def test_recorder_gives_up_on_the_end_of_a_stream_after_give_up_s(server):
    async def scenario():
        client = client_for(server)
        store = RequestStore(client, prefix="gone", ttl_s=60)
        recorder = ProgressRecorder(store, "r", PROMPT, {"n": 1}, 9, close_wait_s=5.0, give_up_s=0.0)
        recorder_relay = Relay(recorder, 1)
        server.stop_process(kill=True)
        recorder_relay.chunk(0, [1])
        await recorder.close()
        assert recorder._writer.done() and not recorder.synced()
        await client.aclose()

    asyncio.run(scenario())


def test_create_waits_for_redis_up_to_the_deadline_then_fails_clearly(server):
    async def scenario():
        url = f"redis://pdserve:s3cret@127.0.0.1:{server.port}/0"
        client = aioredis.from_url(url)
        store = RequestStore(client, prefix="c", wait=RedisWait(redact_url(url), wait_s=0.6))
        server.stop_process(kill=True)
        started = time.monotonic()
        with pytest.raises(UnavailableError) as raised:
            await store.create("r", PROMPT, PARAMS, seed=1)
        elapsed = time.monotonic() - started
        message = str(raised.value)
        assert 0.6 <= elapsed < 2.0, elapsed
        assert message.startswith(f"Redis at redis://pdserve:***@127.0.0.1:{server.port}/0 unreachable for 0.6 s: ")
        assert "s3cret" not in message
        await client.aclose()
        # Redis comes back while a create waits: it succeeds.
        client = client_for(server)
        patient = RequestStore(client, prefix="c", wait=RedisWait("redis", wait_s=30))
        created, _ = await asyncio.gather(patient.create("r", PROMPT, PARAMS, seed=1),
                                          asyncio.to_thread(server.start))
        assert created and (await patient.get("r")).prompt_token_ids == PROMPT
        await client.aclose()

    asyncio.run(scenario())


def test_heartbeats_re_register_workers_after_redis_restarts_empty(server):
    async def scenario():
        client = client_for(server)
        registry = WorkerRegistry(client, prefix="reg", ttl_s=30, wait=RedisWait("redis", wait_s=0.3))
        worker = WorkerInfo("d0", "decode", "127.0.0.1:1", "127.0.0.1:2")
        await registry.heartbeat(worker)
        server.stop_process()  # restarts empty: the pooled connection is now a dead one
        server.start()
        await registry.heartbeat(worker)  # this very beat puts the entry and the index back
        assert [w.worker_id for w in await registry.list("decode")] == ["d0"]
        await assert_every_key_has_a_ttl(client, "reg")
        server.stop_process(kill=True)
        with pytest.raises(UnavailableError, match="Redis at redis unreachable for 0.3 s"):
            await registry.list("decode")
        with pytest.raises(RedisConnectionError):  # the worker's heartbeat loop logs it and beats again
            await registry.heartbeat(worker)
        await client.aclose()

    asyncio.run(scenario())


def test_keys_without_ttl_finds_only_keys_with_no_expiry(server):
    async def scenario():
        client = client_for(server)
        await client.set("audit:with", 1, ex=60)
        await client.set("audit:without", 1)
        await client.rpush("audit:list", 1)
        await client.set("audit", 1)
        await client.set("auditx:other", 1)  # another prefix
        await client.set("a[*]:x", 1)  # glob characters in a prefix are literal
        assert await keys_without_ttl(client, "audit") == ["audit", "audit:list", "audit:without"]
        assert await keys_without_ttl(client, "a[*]") == ["a[*]:x"]
        assert await keys_without_ttl(client, "nothing") == []
        await client.aclose()

    asyncio.run(scenario())


def test_redis_wait_rejects_a_negative_wait():
    with pytest.raises(ValueError, match="Redis wait must be >= 0"):
        RedisWait("redis://x", wait_s=-1)
