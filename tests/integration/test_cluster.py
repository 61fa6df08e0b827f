"""The cluster as real processes: embedded Redis, workers and router, driven through Router/Generate."""

from __future__ import annotations

import asyncio

import pytest
import torch

from helpers.hf_reference import hf_greedy
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.v1 import router_pb2, router_pb2_grpc

NUM_REQUESTS = 64
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("cluster") / "tiny", arch="llama", seed=0))


def _prompts(n: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, 500, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


async def _generate_all(cluster, prompts, max_tokens):
    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(prompt):
            request = router_pb2.GenerateRequest(
                prompt_token_ids=router_pb2.TokenIds(ids=prompt),
                sampling=router_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            tokens, text, finish = [], "", None
            async for response in stub.Generate(request, timeout=300):
                if response.HasField("chunk"):
                    tokens += list(response.chunk.token_ids)
                    text += response.chunk.text
                else:
                    finish = response.complete
            return tokens, text, finish

        return await asyncio.gather(*(one(p) for p in prompts))


def _check_against_transformers(model_dir, prompts, results):
    tokenizer = Tokenizer.from_dir(model_dir)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    for (tokens, text, finish), want in zip(results, expected):
        assert tokens == want
        assert text == tokenizer.decode(tokens)
        assert finish.finish_reason == "length" and finish.completion_tokens == MAX_TOKENS


def test_colocated_worker_through_router_matches_transformers(model_dir):
    prompts = _prompts(16)
    with LocalCluster(model_dir, prefill=0, decode=0, colocated=1) as cluster:
        results = asyncio.run(_generate_all(cluster, prompts, MAX_TOKENS))
    _check_against_transformers(model_dir, prompts, results)


def _loads(cluster, role):
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    loads = []
    for proc in cluster.processes:
        if proc.role == role:
            with cluster.channel(proc.address, with_api_key=False) as channel:
                loads.append(worker_pb2_grpc.WorkerControlStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10))
    return loads


def _wait_all_blocks_free(cluster, roles=("prefill", "decode"), timeout_s=30.0):
    """Poll the workers' GetLoad (other processes) until every KV block is free again."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        loads = [load for role in roles for load in _loads(cluster, role)]
        if all(l.num_blocks_free == l.num_blocks_total and l.num_reservations == 0 for l in loads):
            return loads
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still held: {loads}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def disaggregated(model_dir, kv_transfer):
    with LocalCluster(model_dir, prefill=2, decode=2, env={"PDSERVE_KV_TRANSFER": kv_transfer}) as cluster:
        yield cluster


def test_64_concurrent_requests_through_2_prefill_2_decode_match_transformers(model_dir, disaggregated):
    prompts = _prompts(NUM_REQUESTS)
    results = asyncio.run(_generate_all(disaggregated, prompts, MAX_TOKENS))
    _check_against_transformers(model_dir, prompts, results)
    served = [load.num_finished_requests for load in _loads(disaggregated, "decode")]
    assert sum(served) >= NUM_REQUESTS
    assert max(served) <= 0.75 * sum(served), served
    _wait_all_blocks_free(disaggregated)


def test_cancelling_a_stream_frees_blocks_on_both_sides(disaggregated):
    async def cancel_mid_stream():
        async with disaggregated.aio_channel(disaggregated.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            call = stub.Generate(router_pb2.GenerateRequest(
                prompt="a long story " * 20,
                sampling=router_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)))
            seen = 0
            async for response in call:
                seen += len(response.chunk.token_ids)
                if seen >= 5:
                    call.cancel()
                    break
            return seen

    assert asyncio.run(cancel_mid_stream()) >= 5
    _wait_all_blocks_free(disaggregated)


def test_reservation_whose_kv_never_arrives_expires(disaggregated):
    from pdserve.v1 import decode_pb2, decode_pb2_grpc

    decode = next(p for p in disaggregated.processes if p.role == "decode")
    with disaggregated.channel(decode.address, with_api_key=False) as channel:
        reply = decode_pb2_grpc.DecodeWorkerStub(channel).Reserve(
            decode_pb2.ReserveRequest(request_id="never-sent", prompt_tokens=100, max_tokens=4, n=1,
                                      lease_ms=300), timeout=10)
    assert len(reply.block_ids) == 7
    held = [l for l in _loads(disaggregated, "decode") if l.num_reservations]
    assert held and held[0].num_blocks_reserved == 7
    _wait_all_blocks_free(disaggregated, roles=("decode",), timeout_s=10)


def test_pdserve_generate_through_the_router(model_dir, disaggregated):
    import json
    import subprocess
    import sys

    from helpers.secure_switch import client_env, client_flags
    from pdserve.llm import LLM
    from pdserve.models.sampling_params import SamplingParams

    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--router",
                          disaggregated.router_address, "Hello there", "--max-tokens", "10",
                          "--seed", "3", "--ignore-eos", "--json", *client_flags(disaggregated)],
                         capture_output=True, text=True, timeout=120, env=client_env(disaggregated))
    assert out.returncode == 0, out.stderr
    [completion] = [json.loads(line) for line in out.stdout.splitlines()]
    [expected] = LLM(model_dir, threads=1).generate(
        "Hello there", SamplingParams(max_tokens=10, seed=3, ignore_eos=True))
    # Seeded sampling gives the same tokens across servers as in-process.
    assert completion["token_ids"] == expected.samples[0].token_ids
    assert completion["text"] == expected.samples[0].text and completion["finish_reason"] == "length"


def test_request_finished_at_prefill_releases_its_decode_reservation(disaggregated):
    async def one_token():
        async with disaggregated.aio_channel(disaggregated.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            responses = [r async for r in stub.Generate(router_pb2.GenerateRequest(
                prompt="hello", sampling=router_pb2.SamplingParams(max_tokens=1)))]
        return responses[-1].complete

    done = asyncio.run(one_token())
    assert done.finish_reason in ("length", "stop") and done.completion_tokens == 1
    # The lease is 30 s; the blocks must come back long before that.
    _wait_all_blocks_free(disaggregated, roles=("decode",), timeout_s=5)


def test_pdserve_up_with_a_relative_model_path(model_dir, tmp_path):
    """`pdserve up --model DIR` with DIR relative to the user's directory: the servers it starts
    find the checkpoint (they got an absolute path), and the cluster serves the in-process tokens."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from helpers.up_testing import pdserve_up, stop_up
    from pdserve.llm import LLM
    from pdserve.models.sampling_params import SamplingParams

    shutil.copytree(model_dir, tmp_path / "hf")
    with pdserve_up("--model", "hf", "--port", "0", "--openai-port", "0", cwd=tmp_path) as (up, ready):
        router = ready.split()[5]
        out = subprocess.run([sys.executable, "-P", "-m", "pdserve.cli", "generate", "--router", router, "Hello",
                              "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        [expected] = LLM(model_dir, threads=1).generate("Hello", SamplingParams(max_tokens=8, temperature=0,
                                                                                 ignore_eos=True))
        assert json.loads(out.stdout)["token_ids"] == expected.samples[0].token_ids
        children = Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split()
        assert len(children) >= 4, children  # Redis, prefill, decode, router
        stop_up(up)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "up left servers running"


def test_chunked_prefill_and_prefix_hits_move_exact_kv(model_dir, kv_transfer):
    """Prompts of 70-130 tokens computed 32 tokens a step (each layer's KV streamed in parts, and
    over NIXL each part's blocks pinned until read), then the same prompts again, now mostly from
    the prefill server's prefix cache (cached blocks sent first): tokens match transformers and
    every block is free afterwards (no pin outlives its transfer)."""
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 500, (int(n),), generator=gen).tolist() for n in (70, 97, 130)]
    with LocalCluster(model_dir, prefill=1, decode=1, extra_args=["--max-num-batched-tokens", "32"],
                      env={"PDSERVE_KV_TRANSFER": kv_transfer}) as cluster:
        first = asyncio.run(_generate_all(cluster, prompts, MAX_TOKENS))
        again = asyncio.run(_generate_all(cluster, prompts, MAX_TOKENS))
        _wait_all_blocks_free(cluster)
    _check_against_transformers(model_dir, prompts, first)
    _check_against_transformers(model_dir, prompts, again)
