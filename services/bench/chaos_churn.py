"""Churn: many requests through the router while clients cancel some of them at random and
servers are killed (and replaced) at random; afterwards every live server must report all its KV
blocks free and no Redis key may lack a TTL.

    python -m pdserve.bench.chaos churn --requests 2000 --cancel 0.2 --kills 10
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request

import redis.asyncio as aioredis

from pdserve.bench.chaos import greedy_request, make_prompts, run_streams, stream_one, wait_all_blocks_free
from pdserve.cli.cluster import LocalCluster
from pdserve.state.key_audit import keys_without_ttl
from pdserve.v1 import router_pb2_grpc


async def churn(cluster: LocalCluster, args) -> dict:
    """Send args.requests streams (args.concurrency at a time) over a pool of 64 prompts; a
    share args.cancel is cancelled by the client after a random number of tokens; args.kills
    servers (prefill or decode, at random) are SIGKILLed at evenly spaced points and replaced.
    Returns the summary: counts, mismatches against a fault-free run, leak checks, ok."""
    rng = random.Random(args.seed)
    pool = make_prompts(64, args.seed)
    reference = [r.tokens for r in await run_streams(cluster, pool, args.max_tokens)]
    picks = [rng.randrange(len(pool)) for _ in range(args.requests)]
    cancel_at = [rng.randint(1, args.max_tokens - 1) if rng.random() < args.cancel else None for _ in picks]
    kill_at = set(range(args.requests // (args.kills + 1), args.requests, args.requests // (args.kills + 1)))
    kill_at = set(sorted(kill_at)[:args.kills])
    gate = asyncio.Semaphore(args.concurrency)
    results: list = [None] * args.requests
    replacements: list[asyncio.Task] = []
    started = time.monotonic()

    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(i: int) -> None:
            async with gate:
                roles = [r for r in ("prefill", "decode") if len(cluster.servers(r)) >= 2]  # one stays up
                if i in kill_at and roles:
                    role = rng.choice(roles)
                    cluster.kill(rng.choice(cluster.servers(role)))
                    replacements.append(asyncio.ensure_future(asyncio.to_thread(cluster.add_server, role)))
                results[i] = await stream_one(stub, greedy_request(pool[picks[i]], args.max_tokens),
                                              cancel_after=cancel_at[i])

        await asyncio.gather(*(one(i) for i in range(args.requests)))
    await asyncio.gather(*replacements)
    seconds = time.monotonic() - started
    loads = await wait_all_blocks_free(cluster)
    leaked = {name: load.num_blocks_total - load.num_blocks_free for name, load in loads.items()
              if load.num_blocks_free != load.num_blocks_total or load.num_reservations}
    nixl = await asyncio.to_thread(nixl_leaks, cluster)
    client = aioredis.from_url(cluster.redis_url)
    try:
        no_ttl = await keys_without_ttl(client, cluster.prefix)
    finally:
        await client.aclose()
    finished = [(r, reference[p]) for r, p, c in zip(results, picks, cancel_at) if c is None]
    cancelled = [(r, reference[p]) for r, p, c in zip(results, picks, cancel_at) if c is not None]
    summary = {
        "requests": args.requests, "seconds": round(seconds, 1), "kills": len(kill_at),
        "completed": sum(r.finish == "length" for r, _ in finished), "to_complete": len(finished),
        "wrong_tokens": sum(r.tokens != want for r, want in finished),
        "cancelled": sum(r.finish == "cancelled" for r, _ in cancelled), "to_cancel": len(cancelled),
        # a cancelled stream's tokens must still be a prefix of the fault-free ones
        "cancelled_wrong_prefix": sum(r.tokens != want[:len(r.tokens)] for r, want in cancelled),
        "errors": sorted({r.error for r in results if r.error}),
        "workers_with_leaked_blocks": leaked, "redis_keys_without_ttl": no_ttl,
        "nixl_servers": nixl["servers"], "nixl_leaks": nixl["leaks"],
    }
    summary["ok"] = (summary["completed"] == summary["to_complete"] and not summary["wrong_tokens"]
                     and not summary["cancelled_wrong_prefix"] and not summary["errors"]
                     and not leaked and not no_ttl and not nixl["leaks"])
    return summary


NIXL_IDLE = {"pdserve:kv_nixl_reads_in_flight": 0, "pdserve:kv_nixl_pinned_blocks": 0}


def nixl_leaks(cluster: LocalCluster) -> dict:
    """Every live prefill and decode server's NIXL gauges, which must be back at rest: one memory
    registration (the KV cache) per agent, no READ in flight, no KV block pinned for a transfer.
    Returns {"servers": how many have NIXL, "leaks": {server: {gauge: value}}}."""
    servers, leaks = 0, {}
    for proc in cluster.servers("prefill") + cluster.servers("decode"):
        text = urllib.request.urlopen(f"http://{proc.metrics_address}/metrics", timeout=10).read().decode()
        values = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("pdserve:kv_nixl_")}
        if not values:
            continue
        servers += 1
        wrong = {name: value for name, value in values.items() if name in NIXL_IDLE and value != NIXL_IDLE[name]}
        if values.get("pdserve:kv_nixl_registrations") != values.get("pdserve:kv_nixl_agents"):
            wrong["pdserve:kv_nixl_registrations"] = values.get("pdserve:kv_nixl_registrations")
        if wrong:
            leaks[proc.log_path.stem] = wrong
    return {"servers": servers, "leaks": leaks}
