"""Speculative decoding on the decode servers of a real cluster: 64 greedy streams give the tokens of a cluster
without it, and a decode server SIGKILLed mid-speculation costs no token (the router fails its streams over)
and leaves no block held anywhere."""

from __future__ import annotations

import asyncio
import random

import pytest

from pdserve.bench.chaos import run_streams, streams_killed_midway, wait_all_blocks_free
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.telemetry.scrape import scrape_metrics

MAX_TOKENS = 48
SPECULATIVE = {"PDSERVE_SPECULATIVE": "ngram", "PDSERVE_NUM_SPECULATIVE_TOKENS": "4",
               "PDSERVE_SPECULATIVE_MAX_BATCH": "64"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained_spec_cluster"), size="tiny", train_steps=600)


def _prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase (what prompt lookup proposes from)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(3, 500) for _ in range(rng.randint(5, 14))]
        filler = [rng.randrange(3, 500) for _ in range(rng.randint(1, 12))]
        prompts.append(filler + phrase + filler[:3] + phrase + phrase[:2])
    return prompts


def test_speculating_decode_servers_give_the_same_tokens_and_survive_a_kill(trained):
    prompts = _prompts(64, seed=5)
    with LocalCluster(str(trained), prefill=1, decode=1) as plain:
        want = [r.tokens for r in asyncio.run(run_streams(plain, prompts, MAX_TOKENS))]
    assert all(len(tokens) == MAX_TOKENS for tokens in want)
    with LocalCluster(str(trained), prefill=1, decode=2, role_env={"decode": SPECULATIVE}) as cluster:
        got = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
        assert got == want
        accepted = sum(scrape_metrics(p.metrics_address).get("pdserve:speculative_accepted_tokens_total", 0.0)
                       for p in cluster.servers("decode"))
        assert accepted > 0  # the decode servers speculated, and proposals were accepted

        victim = cluster.servers("decode")[0]
        results = asyncio.run(streams_killed_midway(cluster, prompts, MAX_TOKENS, lambda: cluster.kill(victim)))
        assert [r.error for r in results if r.error] == []
        assert [r.tokens for r in results] == want
        assert "retrying" in cluster.servers("router")[0].log_path.read_text()
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads
        log = cluster.servers("decode")[0].log_path.read_text()
        assert "speculative" in log  # the survivor said at start that it speculates
