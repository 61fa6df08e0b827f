"""--routing kv through a real cluster (2 prefill + 1 decode servers, embedded Redis): a prompt's next
turn goes to the prefill server whose prefix cache holds the prompt, which then computes only the
new tokens; greedy tokens equal a run with --routing load."""

from __future__ import annotations

import json
import random

import pytest
import redis

from helpers.observability_testing import generate_all, request_for, scrape, wait_until
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.state.kv_events import PrefixIndex, stream_key

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kv_routing") / "tiny", seed=0, size="tiny")


def holder_of(cluster: LocalCluster, prompt: list[int]) -> str:
    """The prefill server whose published cache holds all of the prompt's full blocks, per the stream read
    from its start into an index of our own (the router's class, not the router's instance)."""
    client = redis.Redis.from_url(cluster.redis.url)
    try:
        streams = client.keys(stream_key("*"))  # under the cluster's own Redis prefix (none before a publish)
        index = PrefixIndex(None, "")
        for _, fields in (entry for stream in streams for entry in client.xrange(stream)):
            index.apply(fields[b"worker"].decode(), int(fields[b"block_size"]), fields[b"kind"].decode(),
                        json.loads(fields[b"data"]))
    finally:
        client.close()
    full = len(prompt) // BLOCK_SIZE * BLOCK_SIZE
    holders = [worker for worker in index.workers if index.cached_tokens(worker, prompt) == full]
    return holders[0] if holders else ""


def prefix_hits(cluster: LocalCluster) -> dict[str, float]:
    """Prompt tokens each prefill server served from its prefix cache, by worker id."""
    prefill = [p for p in cluster.processes if p.role == "prefill"]  # started as prefill-0, prefill-1, ...
    return {f"prefill-{i}": scrape(p.metrics_address)["pdserve:prefix_cache_hits_total"] for i, p in enumerate(prefill)}


def run_two_turns(cluster: LocalCluster, first_turns: list[list[int]], second_turns: list[list[int]], kv: bool):
    first = generate_all(cluster.router_address, [request_for(p, 4, temperature=0.0) for p in first_turns])
    assert all(g.error is None for g in first), first
    holders = []
    for prompt in first_turns:
        wait_until(lambda prompt=prompt: holder_of(cluster, prompt) != "", 30, "the prefill servers' KV events")
        holders.append(holder_of(cluster, prompt))
    router_metrics = next(p.metrics_address for p in cluster.processes if p.role == "router")
    for holder in set(holders) if kv else ():  # the router has applied what the stream says
        wait_until(lambda h=holder: scrape(router_metrics).get(f'pdserve:router_kv_index_blocks{{worker={h}}}', 0) > 0,
                   30, f"the router's index of {holder}")
    hits_before = prefix_hits(cluster)
    second = []
    for prompt in second_turns:  # one at a time: the choice is the cache's, not the queues'
        (result,) = generate_all(cluster.router_address, [request_for(prompt, 8, temperature=0.0)])
        assert result.error is None, result.error
        second.append(result.token_ids)
    hits = {w: prefix_hits(cluster)[w] - hits_before[w] for w in hits_before}
    return [g.token_ids for g in first], second, holders, hits


def test_a_second_turn_goes_to_the_prefill_server_holding_its_prefix(model_dir):
    rng = random.Random(7)
    first_turns = [[rng.randrange(3, 500) for _ in range(70)] for _ in range(2)]  # 4 full blocks each
    second_turns = [p + [rng.randrange(3, 500) for _ in range(20)] for p in first_turns]
    args = ["--heartbeat-s", "0.2"]
    with LocalCluster(model_dir, prefill=2, decode=1, extra_args=args) as cluster:  # --routing kv: the default
        kv_first, kv_second, holders, hits = run_two_turns(cluster, first_turns, second_turns, kv=True)
    for holder in holders:  # each second turn found its 4 blocks where its first turn left them
        assert hits[holder] >= 64 * holders.count(holder), (holders, hits)
    with LocalCluster(model_dir, prefill=2, decode=1, extra_args=[*args, "--routing", "load"]) as cluster:
        load_first, load_second, _, _ = run_two_turns(cluster, first_turns, second_turns, kv=False)
    assert (kv_first, kv_second) == (load_first, load_second)  # routing never changes a token
