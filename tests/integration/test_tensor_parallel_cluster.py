"""Servers split over 2 rank processes each (--tensor-parallel-size 2, gloo): exact tokens through the router
for colocated servers and for every pairing of prefill and decode sizes (the KV transfer maps heads between
the two layouts), and a rank killed mid-stream takes its whole server down while the router's failover
finishes every stream on another server, token for token."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from pdserve.bench.chaos import make_prompts, run_streams, streams_killed_midway, wait_all_blocks_free
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model

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


def _tensor_parallel_env(prefill_size: int, decode_size: int, kv_transfer: str) -> dict[str, dict[str, str]]:
    return {role: {"PDSERVE_TENSOR_PARALLEL_SIZE": str(size), "PDSERVE_KV_TRANSFER": kv_transfer}
            for role, size in (("prefill", prefill_size), ("decode", decode_size))}


def _kill_a_rank_mid_stream(cluster: LocalCluster, victim, prompts: list[list[int]]):
    """Stream every prompt, SIGKILL the victim server's rank 1 once a quarter of the tokens are out;
    returns (the streams' results, the killed rank's pid)."""
    rank = _rank_process(victim.process.pid)
    return asyncio.run(streams_killed_midway(cluster, prompts, MAX_TOKENS, lambda: os.kill(rank, signal.SIGKILL))), rank


def _assert_gone(cluster: LocalCluster, victim, rank: int) -> None:
    """The server whose rank died stopped on its own (nonzero), none of its processes is left, and the
    router failed its streams over."""
    victim.process.wait(timeout=60)
    assert victim.process.returncode != 0
    deadline = time.monotonic() + 30
    while _alive(rank) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(rank)
    assert "the engine failed" in victim.log_path.read_text()
    assert "retrying" in cluster.servers("router")[0].log_path.read_text()
    cluster.processes.remove(victim)  # it is gone: the cluster no longer has it to stop or to ask


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
        results, rank = _kill_a_rank_mid_stream(cluster, victim, prompts)
        assert [r.error for r in results if r.error] == []
        assert [r.tokens for r in results] == want
        _assert_gone(cluster, victim, rank)
        (survivor,) = cluster.servers("colocated")
        assert survivor.process.poll() is None
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads


@pytest.fixture(scope="module")
def disaggregated_tokens(trained):
    """32 prompts and their greedy tokens through prefill TP=1 -> decode TP=1 (the reference)."""
    prompts = make_prompts(32, seed=47)
    with LocalCluster(str(trained), prefill=1, decode=1) as cluster:
        want = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
    assert all(len(tokens) == MAX_TOKENS for tokens in want)
    return prompts, want


@pytest.mark.parametrize("prefill_size,decode_size,kv_transfer", [(2, 1, "tcp"), (1, 2, "tcp"), (2, 1, "nixl"),
                                                                  (1, 2, "nixl")])
def test_prefill_and_decode_of_different_sizes_give_the_tokens_of_whole_servers(
        trained, disaggregated_tokens, prefill_size, decode_size, kv_transfer):
    prompts, want = disaggregated_tokens
    with LocalCluster(str(trained), prefill=1, decode=1,
                      role_env=_tensor_parallel_env(prefill_size, decode_size, kv_transfer)) as cluster:
        got = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
        assert got == want
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads


@pytest.mark.parametrize("kv_transfer", ["tcp", "nixl"])
def test_split_prefill_and_decode_and_a_dead_decode_rank(trained, disaggregated_tokens, kv_transfer):
    """TP=2 -> TP=2 gives the reference tokens; a decode server's rank SIGKILLed during 32 streams: every
    stream completes exactly on the other decode server, and nothing of the dead server is left."""
    prompts, want = disaggregated_tokens
    with LocalCluster(str(trained), prefill=1, decode=2, role_env=_tensor_parallel_env(2, 2, kv_transfer)) as cluster:
        got = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
        assert got == want
        victim = cluster.servers("decode")[0]
        results, rank = _kill_a_rank_mid_stream(cluster, victim, prompts)
        assert [r.error for r in results if r.error] == []
        assert [r.tokens for r in results] == want
        _assert_gone(cluster, victim, rank)
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads
