"""Waiting is not failing (a real cluster): a request queued for a decode batch slot longer than
the router's stream idle timeout is kept alive by the decode server's keepalives, not retried; a
reservation whose KV sender is attached (its prompt queued on the prefill server) outlives its
lease, and one with no sender still expires on time; a Prefill call waiting past the router's
rpc timeout is not retried while its server answers probes."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from helpers.observability_testing import request_for, scrape, wait_until
from pdserve.cli.cluster import LocalCluster
from pdserve.engine.setup import EngineArgs, build_engine
from pdserve.kvtransfer import KVLayout, TCPKVSender
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.v1 import decode_pb2, decode_pb2_grpc, router_pb2_grpc, worker_pb2, worker_pb2_grpc

IDLE_TIMEOUT_S = 1.0  # the router's --stream-idle-timeout-s
KEEPALIVE_S = 0.2  # the workers' --stream-keepalive-s
MAX_TOKENS = 200
CONCURRENT = 10  # with --max-num-seqs 1, the last one waits for nine whole generations
LEASE_MS = 600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("liveness") / "tiny", arch="llama", seed=0))


@pytest.fixture(scope="module")
def cluster(model_dir):
    args = ["--max-num-seqs", "1", "--stream-idle-timeout-s", str(IDLE_TIMEOUT_S),
            "--stream-keepalive-s", str(KEEPALIVE_S)]
    with LocalCluster(model_dir, prefill=1, decode=1, extra_args=args) as running:
        yield running


def _address(cluster: LocalCluster, role: str, metrics: bool = False) -> str:
    proc = next(p for p in cluster.processes if p.role == role)
    return proc.metrics_address if metrics else proc.address


def _retries(cluster: LocalCluster) -> float:
    return sum(v for k, v in scrape(_address(cluster, "router", metrics=True)).items()
               if k.startswith("pdserve:router_retries_total"))


def _reservations(cluster: LocalCluster) -> int:
    with cluster.channel(_address(cluster, "decode"), with_api_key=False) as channel:
        load = worker_pb2_grpc.WorkerControlStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return load.num_reservations


def test_requests_waiting_for_a_decode_slot_beyond_the_idle_timeout_are_not_retried(cluster, model_dir):
    prompts = [[7 + i, 11, 13, 17, 19, 23, 29, 31 + i] for i in range(CONCURRENT)]
    engine, _ = build_engine(EngineArgs(model=model_dir, kv_cache_mb=64))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [r.samples[0].token_ids for r in engine.generate(prompts, params)]
    retries_before = _retries(cluster)

    async def one(stub, prompt):
        tokens, gaps, last = [], [], None
        async for response in stub.Generate(request_for(prompt, MAX_TOKENS, temperature=0.0), timeout=120):
            if response.HasField("chunk"):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                tokens += list(response.chunk.token_ids)
        return tokens, max(gaps, default=0.0)

    async def run():
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(one(stub, p) for p in prompts))

    results = asyncio.run(run())
    longest_wait = max(gap for _, gap in results)
    print(f"longest silence a client saw: {longest_wait:.2f} s (router idle timeout {IDLE_TIMEOUT_S} s)")
    assert [tokens for tokens, _ in results] == expected
    # The test can fail: some request really waited for its slot longer than the idle timeout ...
    assert longest_wait > IDLE_TIMEOUT_S, longest_wait
    # ... and the router took none of those waits for a failure.
    assert _retries(cluster) == retries_before


def _layout(model_dir: str) -> KVLayout:
    engine, _ = build_engine(EngineArgs(model=model_dir, kv_cache_mb=4))
    return KVLayout.from_kv_caches(engine.runner.kv_caches)


def test_a_lease_is_renewed_while_its_sender_is_attached_and_ends_once_it_leaves(cluster, model_dir):
    sender = TCPKVSender(_layout(model_dir))
    with cluster.channel(_address(cluster, "decode"), with_api_key=False) as channel:
        decode = decode_pb2_grpc.DecodeWorkerStub(channel)

        def reserve(request_id: str) -> decode_pb2.ReserveResponse:
            return decode.Reserve(decode_pb2.ReserveRequest(request_id=request_id, prompt_tokens=20, max_tokens=4,
                                                            n=1, lease_ms=LEASE_MS), timeout=10)

        # No sender: the lease ends on time.
        reserved_at = time.monotonic()
        reserve("no-sender")
        wait_until(lambda: _reservations(cluster) == 0, 10, "the unattached reservation to expire")
        assert time.monotonic() - reserved_at >= LEASE_MS / 1000

        # A sender attached (its prompt "queued" on a prefill server): held for 3 leases and more.
        reservation = reserve("queued-prefill")
        transfer = sender.open(reservation.kv_endpoint, reservation.reservation_id, 20, list(reservation.block_ids))
        try:
            time.sleep(3 * LEASE_MS / 1000)  # the subject of the test: time passing beyond the lease
            assert _reservations(cluster) == 1
        finally:
            transfer.cancel()  # the sender leaves: the lease is no longer renewed
        wait_until(lambda: _reservations(cluster) == 0, 10, "the reservation to expire once its sender left")
        with pytest.raises(grpc.RpcError) as gone:  # and its Decode finds it closed
            list(decode.Decode(decode_pb2.DecodeRequest(request_id="queued-prefill",
                                                        reservation_id=reservation.reservation_id,
                                                        prompt_token_ids=list(range(5, 25))), timeout=10))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


RPC_TIMEOUT_S = 1.0  # the router's --rpc-timeout-s: a pending Prefill probes its server this often


@pytest.fixture(scope="module")
def two_prefill(model_dir):
    # One sequence and 8 tokens per prefill step: twelve 1,200-token prompts queue for seconds.
    args = ["--rpc-timeout-s", str(RPC_TIMEOUT_S), "--max-num-seqs", "1", "--max-num-batched-tokens", "8"]
    with LocalCluster(model_dir, prefill=2, decode=1, extra_args=args) as running:
        yield running


def _greedy_tokens(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine, _ = build_engine(EngineArgs(model=model_dir, kv_cache_mb=64))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [r.samples[0].token_ids for r in engine.generate(prompts, params)]


def _run_all(cluster: LocalCluster, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], float]]:
    async def one(stub, prompt):
        started, tokens = time.monotonic(), []
        async for response in stub.Generate(request_for(prompt, max_tokens, temperature=0.0), timeout=120):
            if response.HasField("chunk"):
                tokens += list(response.chunk.token_ids)
        return tokens, time.monotonic() - started

    async def run():
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(one(stub, p) for p in prompts))

    return asyncio.run(run())


def test_a_prefill_queued_longer_than_the_rpc_timeout_is_not_retried(two_prefill, model_dir):
    prompts = [[5 + (i * 7 + j) % 490 for j in range(1200)] for i in range(12)]
    expected = _greedy_tokens(model_dir, prompts, 4)
    before = _retries(two_prefill)
    results = _run_all(two_prefill, prompts, 4)
    slowest = max(seconds for _, seconds in results)
    print(f"slowest of 12 queued prefills: {slowest:.2f} s (rpc timeout {RPC_TIMEOUT_S} s)")
    assert [tokens for tokens, _ in results] == expected
    assert slowest > 2 * RPC_TIMEOUT_S, slowest  # some prompt really waited past the probe interval
    assert _retries(two_prefill) == before
