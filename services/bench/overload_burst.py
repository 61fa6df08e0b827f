"""A burst far above the router's capacity: how fast the overflow is refused, and that the
accepted requests still complete.

    python -m pdserve.bench.overload_burst                      # local cluster, capacity 16, burst 10x
    python -m pdserve.bench.overload_burst --capacity 64 --burst 2000 --clients 4
    python -m pdserve.bench.overload_burst --router HOST:PORT --burst 1000   # a running router

The burst is split over --clients processes (one gRPC channel each) that all fire at the same
instant, each sending its share concurrently. A refused call must be RESOURCE_EXHAUSTED with a
retry hint; its latency is from the call's start to the refusal, as the client sees it (the
client processes share the machine with the cluster, so this is an upper bound). Prints the
counts, rejection latency p50/p90/p99/max and the accepted calls' end-to-end p50, then one JSON
line with the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
import numpy as np

from pdserve.runtime.retry_hint import retry_after_ms_of
from pdserve.v1 import router_pb2, router_pb2_grpc

START_DELAY_S = 2.0  # the client processes get ready, then all start at one wall-clock instant


@dataclass
class CallResult:
    """One Generate call: its status name, seconds to its end, tokens received, retry hint."""

    code: str
    seconds: float
    tokens: int
    retry_after_ms: int | None


async def _one(stub: router_pb2_grpc.RouterStub, prompt: list[int], max_tokens: int) -> CallResult:
    request = router_pb2.GenerateRequest(
        prompt_token_ids=router_pb2.TokenIds(ids=prompt),
        sampling=router_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    started, tokens = time.perf_counter(), 0
    try:
        async for response in stub.Generate(request, timeout=600):
            if response.HasField("chunk"):
                tokens += len(response.chunk.token_ids)
    except grpc.aio.AioRpcError as error:
        return CallResult(error.code().name, time.perf_counter() - started, tokens, retry_after_ms_of(error))
    return CallResult("OK", time.perf_counter() - started, tokens, None)


def client_process(address: str, count: int, max_tokens: int, seed: int, start_at: float) -> list[CallResult]:
    """Send `count` calls at once from this process at wall time start_at; their results."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(8, 64))] for _ in range(count)]

    async def run() -> list[CallResult]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            await channel.channel_ready()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            return await asyncio.gather(*(_one(stub, p, max_tokens) for p in prompts))

    return asyncio.run(run())


def run_burst(address: str, burst: int, clients: int, max_tokens: int) -> list[CallResult]:
    """The burst from `clients` processes (spawned: gRPC does not survive fork)."""
    shares = [burst // clients + (i < burst % clients) for i in range(clients)]
    start_at = time.time() + START_DELAY_S
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        parts = pool.starmap(client_process, [(address, n, max_tokens, i, start_at) for i, n in enumerate(shares)])
    return [result for part in parts for result in part]


def summarize(results: list[CallResult], max_tokens: int) -> dict:
    """Counts and latency percentiles (ms) of a burst's results."""
    rejected = [r for r in results if r.code == "RESOURCE_EXHAUSTED"]
    accepted = [r for r in results if r.code == "OK"]
    others = sorted({r.code for r in results} - {"OK", "RESOURCE_EXHAUSTED"})
    reject_ms = np.array([r.seconds * 1000 for r in rejected]) if rejected else np.zeros(1)
    return {
        "calls": len(results), "accepted": len(accepted), "rejected": len(rejected), "other_errors": others,
        "accepted_complete": sum(r.tokens == max_tokens for r in accepted),
        "rejected_with_hint": sum(r.retry_after_ms is not None for r in rejected),
        "rejection_ms": {f"p{q}": round(float(np.percentile(reject_ms, q)), 1) for q in (50, 90, 99)}
        | {"max": round(float(reject_ms.max()), 1)},
        "accepted_e2e_p50_ms": round(float(np.median([r.seconds * 1000 for r in accepted])), 1) if accepted else None,
    }


def _print(summary: dict, capacity: int | None) -> None:
    cap = f"capacity {capacity}, " if capacity else ""
    ms = summary["rejection_ms"]
    print(f"burst of {summary['calls']} ({cap}{summary['accepted']} accepted, {summary['rejected']} rejected, "
          f"other errors: {summary['other_errors'] or 'none'})")
    print(f"  accepted that completed: {summary['accepted_complete']}/{summary['accepted']}, "
          f"end-to-end p50 {summary['accepted_e2e_p50_ms']} ms")
    print(f"  rejections with a retry hint: {summary['rejected_with_hint']}/{summary['rejected']}")
    print(f"  rejection latency: p50 {ms['p50']} ms, p90 {ms['p90']} ms, p99 {ms['p99']} ms, max {ms['max']} ms")
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    """Run the burst against --router, or against a local cluster started here."""
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.overload_burst",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", help="host:port of a running router (default: start a local cluster)")
    parser.add_argument("--model", help="checkpoint for the local cluster (default: a tiny model made here)")
    parser.add_argument("--capacity", type=int, default=16, help="the local router's --max-inflight-requests")
    parser.add_argument("--burst", type=int, help="calls in the burst (default: 10x --capacity)")
    parser.add_argument("--clients", type=int, default=2, help="client processes sharing the burst")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each accepted call generates")
    ns = parser.parse_args(argv)
    burst = ns.burst or 10 * ns.capacity
    if burst < 1 or ns.clients < 1 or ns.capacity < 1:
        parser.error("--burst, --clients and --capacity must be >= 1")
    if ns.router:
        _print(summarize(run_burst(ns.router, burst, ns.clients, ns.max_tokens), ns.max_tokens), None)
        return 0
    from pdserve.cli.cluster import LocalCluster

    model = ns.model
    if model is None:
        from pdserve.models.tiny_model import make_tiny_model

        model = str(make_tiny_model(tempfile.mkdtemp(prefix="pdserve-overload-") + "/tiny"))
    args = ["--max-inflight-requests", str(ns.capacity)]
    with LocalCluster(model, prefill=1, decode=1, extra_args=args) as cluster:
        run_burst(cluster.router_address, 1, 1, ns.max_tokens)  # warm-up: channels, Redis, first compiles
        summary = summarize(run_burst(cluster.router_address, burst, ns.clients, ns.max_tokens), ns.max_tokens)
        dead = [p.role for p in cluster.processes if p.process.poll() is not None]
        summary["dead_processes"] = dead
        _print(summary, ns.capacity)
    return 0 if not dead and not summary["other_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
