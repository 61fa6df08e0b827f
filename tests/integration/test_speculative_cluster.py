"""Speculative decoding (n-gram, and a draft model) on the decode servers of a real cluster: 64 greedy streams give
the tokens of a cluster without it, and a decode server SIGKILLed mid-speculation costs no token (the router fails
its streams over) and leaves no block held anywhere (the draft's cache uses the model's blocks)."""

from __future__ import annotations

import asyncio
import random

import pytest

from pdserve.bench.chaos import run_streams, streams_killed_midway, wait_all_blocks_free
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.telemetry.scrape import scrape_metrics

MAX_TOKENS = 48
SPECULATIVE = {"PDSERVE_NUM_SPECULATIVE_TOKENS": "4", "PDSERVE_SPECULATIVE_MAX_BATCH": "64"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained_spec_cluster"), size="tiny", train_steps=600)


@pytest.fixture(scope="module")
def plain_tokens(trained):
    """The tokens of a cluster without speculation."""
    with LocalCluster(str(trained), prefill=1, decode=1) as plain:
        want = [r.tokens for r in asyncio.run(run_streams(plain, _prompts(64, seed=5), MAX_TOKENS))]
    assert all(len(tokens) == MAX_TOKENS for tokens in want)
    return want


def _prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase (what prompt lookup proposes from)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(3, 500) for _ in range(rng.randint(5, 14))]
        filler = [rng.randrange(3, 500) for _ in range(rng.randint(1, 12))]
        prompts.append(filler + phrase + filler[:3] + phrase + phrase[:2])
    return prompts


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculating_decode_servers_give_the_same_tokens_and_survive_a_kill(trained, plain_tokens, method):
    """The draft model is the model itself (a checkpoint directory of its own): nearly every proposal is accepted,
    which needs the draft's KV right after the prompt's KV arrived from the prefill server."""
    prompts, want = _prompts(64, seed=5), plain_tokens
    env = {**SPECULATIVE, "PDSERVE_SPECULATIVE": method}
    if method == "draft":
        env["PDSERVE_DRAFT_MODEL"] = str(trained)
    with LocalCluster(str(trained), prefill=1, decode=2, role_env={"decode": env}) as cluster:
        got = [r.tokens for r in asyncio.run(run_streams(cluster, prompts, MAX_TOKENS))]
        assert got == want
        metrics = [scrape_metrics(p.metrics_address) for p in cluster.servers("decode")]
        accepted = sum(m.get("pdserve:speculative_accepted_tokens_total", 0.0) for m in metrics)
        proposed = sum(m.get("pdserve:speculative_proposed_tokens_total", 0.0) for m in metrics)
        assert accepted > 0  # the decode servers speculated, and proposals were accepted
        if method == "draft":
            assert accepted > 0.9 * proposed, (accepted, proposed)

        victim = cluster.servers("decode")[0]
        results = asyncio.run(streams_killed_midway(cluster, prompts, MAX_TOKENS, lambda: cluster.kill(victim)))
        assert [r.error for r in results if r.error] == []
        assert [r.tokens for r in results] == want
        assert "retrying" in cluster.servers("router")[0].log_path.read_text()
        loads = asyncio.run(wait_all_blocks_free(cluster))
        assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads
        log = cluster.servers("decode")[0].log_path.read_text()
        assert f"speculative decoding: {method}" in log  # the survivor said at start that it speculates
