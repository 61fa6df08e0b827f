"""Tracing overhead (issue 6): output tokens/s of a disaggregated cluster with tracing on
(every server exporting its spans over OTLP to a local collector process) against the same
cluster with tracing off, measured in the same run. Target: on / off >= 0.95.

    python -m pdserve.bench.tracing_bench [--size tiny] [--rounds 3] [--num-requests 64]
        [--concurrency 16] [--max-tokens 64] [--json out.json]

Both clusters (prefill + decode + router each, on the embedded Redis) stay up for the whole run
and are measured in alternating rounds (off, on, on, off, ...), so drift on a noisy machine hits
both alike; the collector is `python -m pdserve.telemetry.otlp_sink`, a real OTLP/gRPC
receiver in its own process. Workload per round: num_requests prompts of 32-128 random token ids
(fixed seed), max_tokens outputs with ignore_eos, at most `concurrency` streams at once.
Printed: each round's tokens/s and the servers' CPU ms per token, the medians per mode, the
ratios (throughput on / off; CPU per token off / on), and the spans the collector got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import SIZES, make_tiny_model
from pdserve.runtime.channels import CHANNEL_OPTIONS
from pdserve.v1 import router_pb2, router_pb2_grpc

TARGET = 0.95


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.tracing_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=SIZES, help="make-tiny-model size (default tiny)")
    p.add_argument("--model-dir", default=None, help="use this checkpoint instead of making one")
    p.add_argument("--rounds", type=int, default=3, help="measurements per mode")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def make_prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts of 32-128 random token ids (ids 2..499: inside every tiny model's vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 129, (n,), generator=gen).tolist()
    return [torch.randint(2, 500, (k,), generator=gen).tolist() for k in lengths]


async def run_load(address: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[int, float]:
    """Stream every prompt through the router, `concurrency` at a time: (output tokens, seconds)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(stub, prompt) -> int:
        request = router_pb2.GenerateRequest(prompt_token_ids=router_pb2.TokenIds(ids=prompt),
                                             sampling=router_pb2.SamplingParams(max_tokens=max_tokens,
                                                                                ignore_eos=True, seed=1))
        async with limit:
            tokens = 0
            async for response in stub.Generate(request, timeout=600):
                if response.HasField("chunk"):
                    tokens += len(response.chunk.token_ids)
            return tokens

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(stub, p) for p in prompts))
        return sum(counts), time.perf_counter() - started


def cluster_cpu_seconds(cluster: LocalCluster) -> float:
    """CPU seconds (user + system) the cluster's server processes have used so far (Linux
    /proc; 0.0 elsewhere). Unlike wall time, other programs on the machine barely move it."""
    total = 0.0
    for proc in cluster.processes:
        try:
            fields = Path(f"/proc/{proc.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_collector() -> tuple[subprocess.Popen, str]:
    """The OTLP receiver process and its endpoint."""
    process = subprocess.Popen([sys.executable, "-P", "-m", "pdserve.telemetry.otlp_sink"], stdout=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline().split()
    if not line or line[0] != "READY":
        process.kill()
        raise RuntimeError(f"the OTLP collector did not start: {line}")
    return process, line[1]


def stop_collector(process: subprocess.Popen) -> int:
    """Stop the collector; the number of spans it received."""
    process.terminate()
    out, _ = process.communicate(timeout=30)
    counts = [int(line.split()[1]) for line in out.splitlines() if line.startswith("SPANS ")]
    return counts[-1] if counts else -1


def measure(args: argparse.Namespace, model_dir: str) -> dict:
    """Start both clusters and the collector, run the alternating rounds, stop everything."""
    prompts = make_prompts(args.num_requests, args.seed)
    collector, endpoint = start_collector()
    common = ["--kv-cache-mb", "256"]
    clusters = {"off": LocalCluster(model_dir, threads_per_worker=args.threads, extra_args=common),
                "on": LocalCluster(model_dir, threads_per_worker=args.threads,
                                   extra_args=[*common, "--otlp-endpoint", endpoint])}
    rounds: dict[str, list[float]] = {"off": [], "on": []}
    cpu_ms_per_token: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for cluster in clusters.values():
            cluster.start()
            asyncio.run(run_load(cluster.router_address, prompts[:8], 8, args.concurrency))  # warm up
        for i in range(args.rounds):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                cpu_before = cluster_cpu_seconds(clusters[mode])
                tokens, seconds = asyncio.run(run_load(clusters[mode].router_address, prompts, args.max_tokens,
                                                       args.concurrency))
                cpu = cluster_cpu_seconds(clusters[mode]) - cpu_before
                rounds[mode].append(tokens / seconds)
                cpu_ms_per_token[mode].append(1000 * cpu / tokens)
                print(f"round {i + 1} tracing {mode:3s}: {tokens} tokens in {seconds:.2f} s = "
                      f"{tokens / seconds:.1f} tok/s; servers used {1000 * cpu / tokens:.2f} CPU ms/token",
                      flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
        spans = stop_collector(collector)
    off, on = statistics.median(rounds["off"]), statistics.median(rounds["on"])
    cpu_off, cpu_on = (statistics.median(cpu_ms_per_token[m]) for m in ("off", "on"))
    return {"rounds": rounds, "off_tok_s": off, "on_tok_s": on, "ratio": on / off, "target": TARGET,
            "cpu_ms_per_token": cpu_ms_per_token, "cpu_ratio": cpu_off / cpu_on if cpu_on else None,
            "spans_exported": spans, "num_requests": args.num_requests, "max_tokens": args.max_tokens,
            "concurrency": args.concurrency}


def main(argv: list[str] | None = None) -> dict:
    """Run and print the comparison."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(make_tiny_model(Path(tmp) / "model", arch="llama", seed=0, size=args.size))
        result = measure(args, model_dir)
    verdict = "met" if result["ratio"] >= TARGET else "NOT met"
    print(f"\ntracing off: {result['off_tok_s']:.1f} tok/s (median of {args.rounds})")
    print(f"tracing on : {result['on_tok_s']:.1f} tok/s, {result['spans_exported']} spans exported to the collector")
    print(f"on / off   : {result['ratio']:.3f} (target >= {TARGET}: {verdict})")
    if result["cpu_ratio"]:
        print(f"server CPU per token, off / on: {result['cpu_ratio']:.3f} (the same comparison in CPU time, "
              f"which other programs on the machine barely move)")
    print(f"machine load average during the run: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
