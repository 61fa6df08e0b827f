"""Failover with real processes: kill -9 a decode or prefill server during 64 concurrent greedy
streams, or the router itself, and check that every client gets exactly the fault-free tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import grpc
import pytest

from helpers.observability_testing import scrape
from pdserve.bench.chaos import ProgressWatch, kill_round, make_prompts, run_streams, stream_one, wait_all_blocks_free
from pdserve.bench.chaos_churn import churn
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.v1 import router_pb2, router_pb2_grpc

NUM_STREAMS = 64
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("failover") / "tiny", arch="llama", seed=0))


@pytest.fixture(scope="module")
def cluster(model_dir, kv_transfer):
    with LocalCluster(model_dir, prefill=2, decode=2, extra_args=["--max-num-seqs", "128"],
                      env={"PDSERVE_KV_TRANSFER": kv_transfer}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference(cluster):
    prompts = make_prompts(NUM_STREAMS, seed=3)
    results = asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))
    assert all(r.finish == "length" and len(r.tokens) == MAX_TOKENS for r in results)
    return prompts, [r.tokens for r in results]


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_kill_9_mid_stream_loses_and_repeats_nothing(cluster, reference, model_dir, role):
    prompts, want = reference
    router = cluster.servers("router")[0]
    retries_before = router.log_path.read_text().count("retrying")
    counted_before = _retries_counted(router.metrics_address)
    report = asyncio.run(kill_round(cluster, prompts, MAX_TOKENS, want, role, random.Random(role)))
    retries = router.log_path.read_text().count("retrying") - retries_before
    assert retries > 0  # streams really failed over
    assert _retries_counted(router.metrics_address) - counted_before == retries  # each one, by its cause
    assert report.errors == []
    assert report.completed == NUM_STREAMS
    assert report.identical == NUM_STREAMS
    assert report.extra_tokens == 0
    loads = asyncio.run(wait_all_blocks_free(cluster))
    assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads


def test_churn_with_cancellations_and_kills_leaves_no_leak(cluster, kv_transfer):
    """200 streams, a fifth cancelled by their clients at random points, two servers killed and
    replaced meanwhile: completed streams are exact, and afterwards every KV block is free on
    every live server, every Redis key has a TTL and (over NIXL) every server's NIXL gauges are
    at rest: one registration, no READ in flight, no staging region held."""
    args = argparse.Namespace(requests=200, cancel=0.2, kills=2, concurrency=32, max_tokens=MAX_TOKENS, seed=5)
    summary = asyncio.run(churn(cluster, args))
    assert summary["ok"], json.dumps(summary, default=str)  # a string: pytest would cut a dict short
    assert summary["nixl_servers"] == (4 if kv_transfer == "nixl" else 0)


def test_client_resumes_on_another_router_after_router_kill(cluster, model_dir):
    """Seeded sampling, n = 2: router A is killed mid-stream; the client resumes on router B
    with the tokens it holds and ends with exactly the fault-free tokens and text."""
    prompt = make_prompts(1, seed=11)[0]
    sampling = router_pb2.SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234, n=2,
                                         ignore_eos=True, stop=["zz"])

    def request(request_id: str) -> router_pb2.GenerateRequest:
        return router_pb2.GenerateRequest(request_id=request_id, sampling=sampling,
                                          prompt_token_ids=router_pb2.TokenIds(ids=prompt))

    async def collect(address: str, message, tokens, texts, finishes, stop_after: int | None = None,
                      on_enough=None):
        async with cluster.aio_channel(address) as channel:
            async for response in router_pb2_grpc.RouterStub(channel).Generate(message, timeout=120):
                if response.HasField("chunk"):
                    tokens[response.chunk.index] += response.chunk.token_ids
                    texts[response.chunk.index] += response.chunk.text
                    if stop_after is not None and sum(map(len, tokens)) >= stop_after:
                        on_enough()  # the router dies under us: reading on raises UNAVAILABLE
                        stop_after = None
                else:
                    finishes[response.complete.index] = response.complete.finish_reason

    async def scenario():
        fault_free = ([[], []], ["", ""], [None, None])
        await collect(cluster.router_address, request("resume-reference"), *fault_free)
        router_b = await asyncio.to_thread(cluster.add_server, "router")
        router_a = cluster.servers("router")[0]
        got = ([[], []], ["", ""], [None, None])
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(router_a.address, request("resume-me"), *got, stop_after=25,
                          on_enough=lambda: cluster.kill(router_a))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        tokens, texts, finishes = got
        resume = router_pb2.GenerateRequest(request_id="resume-me", resume=True,
                                            received_tokens=[len(t) for t in tokens])
        await collect(router_b.address, resume, tokens, texts, finishes)
        return fault_free, got

    fault_free, got = asyncio.run(scenario())
    assert got[0] == fault_free[0]
    assert got[1] == fault_free[1]
    assert got[2] == fault_free[2]
    tokenizer = Tokenizer.from_dir(model_dir)
    for tokens, text, finish in zip(*got):
        if finish == "length":
            assert text == tokenizer.decode(tokens)


def test_resume_of_unknown_request_is_not_found(cluster):
    async def scenario():
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await stream_one(stub, router_pb2.GenerateRequest(request_id="never-seen", resume=True),
                                    ProgressWatch())

    result = asyncio.run(scenario())
    assert result.error is not None and result.error.startswith("NOT_FOUND")


def test_colocated_worker_kill_continues_on_the_other(model_dir):
    """Colocated workers only: a worker killed mid-stream, its requests continue on the other."""
    prompts = make_prompts(16, seed=21)
    with LocalCluster(model_dir, prefill=0, decode=0, colocated=2) as cluster:
        want = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
        router_log = cluster.servers("router")[0].log_path
        report = asyncio.run(kill_round(cluster, prompts, MAX_TOKENS, want, "colocated", random.Random(2),
                                        replace=False))
        assert (report.completed, report.identical, report.extra_tokens, report.errors) == (16, 16, 0, [])
        assert "retrying" in router_log.read_text()  # streams really failed over
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads


def _retries_counted(metrics_address: str) -> float:
    """The router's pdserve:router_retries_total, summed over reasons."""
    return sum(value for name, value in scrape(metrics_address).items()
               if name.startswith("pdserve:router_retries_total"))
