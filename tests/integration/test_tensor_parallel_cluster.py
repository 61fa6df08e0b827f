"""Colocated servers split over 2 rank processes each (--tensor-parallel-size 2, gloo): exact tokens through
the router, and a rank killed mid-stream takes its whole server down while the router's failover finishes
every stream on the other server, token for token."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from pdserve.bench.chaos import ProgressWatch, greedy_request, make_prompts, run_streams, stream_one, wait_all_blocks_free
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.v1 import router_pb2_grpc

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained_tp_cluster"), size="tiny", train_steps=600)


def _children(pid: int) -> list[int]:
    """The pids of pid's child processes (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_process(worker_pid: int) -> int:
    """The worker's tensor-parallel rank 1 (not multiprocessing's resource tracker)."""
    ranks = [c for c in _children(worker_pid)
             if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(ranks) == 1, ranks
    return ranks[0]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_split_servers_give_the_tokens_of_whole_ones_and_a_dead_rank_fails_over(trained):
    prompts = make_prompts(16, seed=31)
    with LocalCluster(str(trained), prefill=0, decode=0, colocated=1) as whole:
        want = [r.tokens for r in asyncio.run(run_streams(whole, prompts, MAX_TOKENS))]
    assert all(len(tokens) == MAX_TOKENS for tokens in want)
    with LocalCluster(str(trained), prefill=0, decode=0, colocated=2,
                      extra_args=["--tensor-parallel-size", "2"]) as cluster:
        got = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
        assert got == want

        victim = cluster.servers("colocated")[0]
        rank = _rank_process(victim.process.pid)

        async def kill_a_rank_mid_stream():
            watch = ProgressWatch()
            async with cluster.aio_channel(cluster.router_address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                streams = asyncio.gather(*(stream_one(stub, greedy_request(p, MAX_TOKENS), watch) for p in prompts))
                await watch.reached("tokens", len(prompts) * MAX_TOKENS // 4)
                os.kill(rank, signal.SIGKILL)
                return await streams

        results = asyncio.run(kill_a_rank_mid_stream())
        assert [r.error for r in results if r.error] == []
        assert [r.tokens for r in results] == want
        # The server whose rank died stopped on its own (nonzero), and none of its processes is left.
        victim.process.wait(timeout=60)
        assert victim.process.returncode != 0
        deadline = time.monotonic() + 30
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(rank)
        assert "the engine failed" in victim.log_path.read_text()
        assert "retrying" in cluster.servers("router")[0].log_path.read_text()  # streams really failed over
        cluster.processes.remove(victim)  # it is gone: the cluster no longer has it to stop or to ask
        (survivor,) = cluster.servers("colocated")
        assert survivor.process.poll() is None
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads
