"""Clients that leave at random moments: how long until every KV block is free again.

    python -m pdserve.bench.cancel_storm                            # 1,000 requests, tiny model
    python -m pdserve.bench.cancel_storm --size base --requests 1000   # ~100M model: slow prefill steps

A local cluster (1 prefill + 1 decode + the OpenAI front end). Requests go in waves of --wave
streamed /v1/completions calls, each with 1 to 4 token-id prompts of 300 to 1,000 tokens (so one
HTTP request is several router requests), and each client drops its TCP connection at a random
moment in [0, --max-delay-s): before, during or after prefill. After a wave's last disconnect the
benchmark polls, every 20 ms, the front end's and the router's requests in flight and the prefill
and decode servers' loads, and records when each is back to zero (no request, no waiting prompt,
no block used, no reservation). Prints the worst and p99 "all free" time over the waves and how
often the prefill engine stopped computing a prompt mid-step (steps stopped, chunks dropped),
then one JSON line; exit 1 when a wave took over --limit-s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
import urllib.request

from pdserve.bench.chaos import worker_loads
from pdserve.cli.cluster import LocalCluster

POLL_S = 0.02


def _in_flight(address: str, metric: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric + " "))


async def _drop_after(address: str, body: bytes, delay_s: float) -> None:
    """POST `body` as a streamed completion and cut the connection after delay_s (or when it ends)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)

    async def read_all() -> None:
        while await reader.read(65536):
            pass

    try:
        await asyncio.wait_for(read_all(), delay_s)
    except TimeoutError:
        pass
    writer.transport.abort()


async def _wave(cluster: LocalCluster, rng: random.Random, size: int, max_delay_s: float) -> float:
    """One wave of `size` requests; returns the monotonic time of its last disconnect."""
    bodies = []
    for _ in range(size):
        prompts = [[rng.randrange(5, 500) for _ in range(rng.randint(300, 1000))] for _ in range(rng.randint(1, 4))]
        bodies.append(json.dumps({"prompt": prompts if len(prompts) > 1 else prompts[0], "max_tokens": 200,
                                  "temperature": 0, "stream": True, "ignore_eos": True}).encode())
    await asyncio.gather(*(_drop_after(cluster.openai_address, b, rng.uniform(0, max_delay_s)) for b in bodies))
    return time.monotonic()


async def _until_free(cluster: LocalCluster, last_disconnect: float, limit_s: float) -> dict[str, float]:
    """Seconds from last_disconnect until each part held nothing (inf: not within 3 * limit_s)."""
    router_metrics = next(p.metrics_address for p in cluster.processes if p.role == "router")
    marks: dict[str, float] = {}
    while len(marks) < 4 and time.monotonic() - last_disconnect < 3 * limit_s:
        now = time.monotonic() - last_disconnect
        # The scrape of the front end's /metrics is itself a request in flight there.
        if "openai" not in marks and await asyncio.to_thread(
                _in_flight, cluster.openai_address, "pdserve_openai_requests_in_flight") <= 1:
            marks["openai"] = now
        if "router" not in marks and await asyncio.to_thread(
                _in_flight, router_metrics, "pdserve:router_requests_in_flight") == 0:
            marks["router"] = now
        for name, load in (await worker_loads(cluster)).items():
            role = name.split("-")[0]
            if role not in marks and load.num_blocks_free == load.num_blocks_total and not load.num_reservations \
                    and not load.num_waiting_requests and not load.num_running_requests:
                marks[role] = now
        await asyncio.sleep(POLL_S)
    return {role: marks.get(role, float("inf")) for role in ("openai", "router", "prefill", "decode")}


async def storm(cluster: LocalCluster, args) -> dict:
    """Run the waves; returns the summary."""
    rng = random.Random(args.seed)
    waves = []
    sent = 0
    while sent < args.requests:
        size = min(args.wave, args.requests - sent)
        last = await _wave(cluster, rng, size, args.max_delay_s)
        marks = await _until_free(cluster, last, args.limit_s)
        waves.append(marks)
        sent += size
        print(f"wave {len(waves)}: {size} requests, free after " +
              ", ".join(f"{role} {s:.2f} s" for role, s in marks.items()), flush=True)
    worst = sorted(max(m.values()) for m in waves)
    prefill_metrics = next(p.metrics_address for p in cluster.processes if p.role == "prefill")
    counters = {name: int(await asyncio.to_thread(_in_flight, prefill_metrics, f"pdserve:{name}_total"))
                for name in ("engine_steps_interrupted", "engine_chunks_dropped", "engine_requests_aborted",
                             "prefill_tokens_computed")}
    return {"requests": sent, "waves": len(waves), "worst_s": round(worst[-1], 3),
            "p99_s": round(worst[min(len(worst) - 1, int(0.99 * len(worst)))], 3),
            "over_limit": sum(1 for w in worst if w > args.limit_s), "limit_s": args.limit_s,
            "prefill": counters}


def main(argv: list[str] | None = None) -> int:
    """CLI: the storm on a fresh local cluster."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.cancel_storm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000, help="HTTP requests in all")
    p.add_argument("--wave", type=int, default=16, help="HTTP requests per wave")
    p.add_argument("--max-delay-s", type=float, default=1.5, help="disconnects fall in [0, this)")
    p.add_argument("--limit-s", type=float, default=2.0, help="a wave must be all free within this")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "base"], help="the generated model's size")
    p.add_argument("--model", default=None, help="a checkpoint instead of a generated one")
    p.add_argument("--kv-cache-mb", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from pdserve.models.tiny_model import make_tiny_model

    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="pdserve-storm-") + "/m", size=args.size))
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True,
                      extra_args=["--kv-cache-mb", str(args.kv_cache_mb)]) as cluster:
        summary = asyncio.run(storm(cluster, args))
    print(f"{summary['requests']} requests in {summary['waves']} waves: every block free {summary['worst_s']:.2f} s "
          f"after the last disconnect at worst (p99 {summary['p99_s']:.2f} s); {summary['over_limit']} waves over "
          f"{args.limit_s:g} s")
    c = summary["prefill"]
    print(f"prefill engine: {c['engine_requests_aborted']} requests aborted, {c['engine_steps_interrupted']} steps "
          f"stopped after a layer (every request gone), {c['engine_chunks_dropped']} chunks dropped mid-step")
    # JSON has no infinity: a wave never all free within 3 * --limit-s is null.
    print(json.dumps({k: None if isinstance(v, float) and math.isinf(v) else v for k, v in summary.items()}))
    return 0 if summary["over_limit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
