"""Graceful shutdown of a real decode server (SIGTERM) while it serves streams: it turns
NOT_SERVING, leaves the registry, refuses new work (the router then tries another server),
finishes every stream it holds, and exits cleanly."""

from __future__ import annotations

import asyncio
import re
import signal

import grpc
import pytest
import redis.asyncio as aioredis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.observability_testing import generate, request_for
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.runtime.lifecycle import is_draining_refusal
from pdserve.state.registry import WorkerInfo, WorkerLoad, WorkerRegistry
from pdserve.v1 import decode_pb2, decode_pb2_grpc, router_pb2_grpc, worker_pb2, worker_pb2_grpc

NUM_STREAMS = 32
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("drain") / "tiny", arch="llama", seed=0)
    with LocalCluster(str(model), prefill=1, decode=2,
                      extra_args=["--kv-cache-mb", "32", "--drain-timeout-s", "60"]) as running:
        yield running


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(2, 500, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


async def _health(cluster: LocalCluster, address: str) -> int:
    async with cluster.aio_channel(address, with_api_key=False) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return response.status


async def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    """Await condition() (a coroutine function) becoming true, re-checking every 20 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _drain_scenario(cluster: LocalCluster, victim) -> tuple[list, list]:
    redis = aioredis.from_url(cluster.redis_url)
    registry = WorkerRegistry(redis, prefix=cluster.prefix, ttl_s=60)
    async with cluster.aio_channel(cluster.router_address) as channel, \
            cluster.aio_channel(victim.address, with_api_key=False) as victim_channel:
        router = router_pb2_grpc.RouterStub(channel)
        progress = [0] * NUM_STREAMS

        def on_chunk(i):
            return lambda n: progress.__setitem__(i, n)

        streams = [asyncio.create_task(generate(router, request_for(p, MAX_TOKENS, f"drain-{i}"), on_chunk=on_chunk(i)))
                   for i, p in enumerate(_prompts(NUM_STREAMS))]
        decode = decode_pb2_grpc.DecodeWorkerStub(victim_channel)
        # A reservation whose Decode never comes keeps the victim draining until we abort it.
        held = await decode.Reserve(decode_pb2.ReserveRequest(request_id="held", prompt_tokens=4, max_tokens=4,
                                                              n=1, lease_ms=60_000))

        async def all_decoding():  # every stream is past its first (prefill) token, none is done
            return min(progress) >= 2
        await _until(all_decoding, "every stream to be decoding")
        assert max(progress) < MAX_TOKENS
        victim.process.send_signal(signal.SIGTERM)

        async def not_serving():
            return await _health(cluster, victim.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        await _until(not_serving, "the victim to report NOT_SERVING")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await decode.Reserve(decode_pb2.ReserveRequest(request_id="late", prompt_tokens=4, max_tokens=4, n=1))
        assert is_draining_refusal(refused.value), refused.value.details()
        live = await registry.list("decode")
        assert len(live) == 1 and live[0].address != victim.address  # the victim left the registry
        # A stale registry entry that sorts first makes the router try the draining server:
        # it must be refused and the request served by the other decode server.
        await registry.heartbeat(WorkerInfo("decode-0-stale", "decode", victim.address, victim.kv_endpoint,
                                            WorkerLoad(free_blocks=10**9, total_blocks=10**9)))
        late = await asyncio.gather(*(generate(router, request_for(p, 8, f"late-{i}"))
                                      for i, p in enumerate(_prompts(4))))
        await registry.deregister("decode", "decode-0-stale")
        results = await asyncio.gather(*streams)
        assert victim.process.poll() is None  # still draining: the held reservation is open
        await worker_pb2_grpc.WorkerControlStub(victim_channel).Abort(
            worker_pb2.WorkerAbortRequest(request_id="held"), timeout=5)
        assert held.reservation_id
    await redis.aclose()
    return results, late


def test_sigterm_to_a_decode_server_during_32_streams_fails_none(cluster):
    victim = next(p for p in cluster.processes if p.role == "decode")
    results, late = asyncio.run(_drain_scenario(cluster, victim))
    failed = [(r.request_id, r.error) for r in results + late if r.error]
    assert not failed
    assert all(len(r.token_ids) == MAX_TOKENS and r.finish_reasons == ["length"] for r in results)
    assert all(len(r.token_ids) == 8 and r.finish_reasons == ["length"] for r in late)
    assert victim.process.wait(timeout=30) == 0
    log = victim.log_path.read_text()
    in_flight = int(re.search(r"draining: (\d+) requests in flight", log).group(1))
    assert in_flight >= 2  # the held reservation and at least one stream were drained
    assert "drained" in log
