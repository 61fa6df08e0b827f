"""Queueing is not failure, measured: closed-loop clients far above the decode servers' batch
limit for minutes, against the same cluster's unloaded capacity measured first in the same run.

    python -m pdserve.bench.queueing_soak                        # 64 clients 60 s, then 256 clients 300 s
    python -m pdserve.bench.queueing_soak --loaded-clients 256 --seconds 60 --baseline-seconds 20

The cluster is local (1 prefill + 1 decode, tiny model unless --model, --max-num-seqs 64 on every
engine). Phase 1 runs as many clients as the decode batch holds (the unloaded capacity); phase 2
runs --loaded-clients, so most requests wait for a slot on the decode server and in the prefill
queue. Each client sends greedy requests of random prompts back to back. Reported per phase:
requests completed, output tokens per second, errors, requests that did not get exactly
--max-tokens tokens and one finish; for the whole run, the router's retries by reason
(pdserve:router_retries_total) and the peak waiting queues seen on the workers. Goodput is the
loaded phase's tokens/s over the unloaded phase's. Prints a summary and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from pdserve.bench.chaos import greedy_request, stream_one, worker_loads
from pdserve.cli.cluster import LocalCluster
from pdserve.v1 import router_pb2_grpc


@dataclass
class Phase:
    """One phase's outcome."""

    clients: int
    seconds: float = 0.0
    completed: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    inexact: int = 0  # completed streams without exactly max_tokens tokens and one finish

    def tokens_per_s(self) -> float:
        """Output tokens per second of wall time."""
        return self.tokens / self.seconds if self.seconds else 0.0


def router_retries(cluster: LocalCluster) -> dict[str, float]:
    """The router's pdserve:router_retries_total by reason."""
    address = next(p.metrics_address for p in cluster.processes if p.role == "router")
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    retries = {}
    for line in text.splitlines():
        if line.startswith("pdserve:router_retries_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            retries[reason] = float(line.rsplit(" ", 1)[1])
    return retries


async def run_phase(cluster: LocalCluster, clients: int, seconds: float, max_tokens: int, rng: random.Random,
                    peaks: dict[str, int]) -> Phase:
    """`clients` closed-loop clients for `seconds` (requests under way at the end are finished)."""
    phase = Phase(clients)
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def client(stub) -> None:
        while time.monotonic() < deadline:
            prompt = [rng.randrange(5, 500) for _ in range(rng.randint(8, 64))]
            result = await stream_one(stub, greedy_request(prompt, max_tokens), timeout_s=600)
            if result.error:
                phase.errors.append(result.error)
                continue
            phase.completed += 1
            phase.tokens += len(result.tokens)
            if len(result.tokens) != max_tokens or result.finish != "length":
                phase.inexact += 1

    async def watch_queues() -> None:
        while time.monotonic() < deadline:
            for name, load in (await worker_loads(cluster)).items():
                role = name.split("-")[0]
                peaks[role] = max(peaks.get(role, 0), load.num_waiting_requests)
            await asyncio.sleep(0.5)

    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        watcher = asyncio.ensure_future(watch_queues())
        await asyncio.gather(*(client(stub) for _ in range(clients)))
        watcher.cancel()
    phase.seconds = time.monotonic() - started
    return phase


def main(argv: list[str] | None = None) -> int:
    """CLI: the two phases on a local cluster; exit 1 when a queueing retry, an error or an
    inexact stream happened, or goodput fell under --min-goodput."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.queueing_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny model)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="every engine's batch limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="every engine's tokens per step (small: a slow prefill, so its queue grows)")
    p.add_argument("--loaded-clients", type=int, default=256)
    p.add_argument("--seconds", type=float, default=300.0, help="the loaded phase")
    p.add_argument("--baseline-seconds", type=float, default=60.0, help="the unloaded phase")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-goodput", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from pdserve.models.tiny_model import make_tiny_model

    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="pdserve-soak-") + "/tiny", seed=0))
    rng = random.Random(args.seed)
    peaks: dict[str, int] = {}
    engine_args = ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens:
        engine_args += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    with LocalCluster(model_dir, prefill=1, decode=1, extra_args=engine_args) as cluster:
        unloaded = asyncio.run(run_phase(cluster, args.max_num_seqs, args.baseline_seconds, args.max_tokens, rng, {}))
        retries_before = router_retries(cluster)
        loaded = asyncio.run(run_phase(cluster, args.loaded_clients, args.seconds, args.max_tokens, rng, peaks))
        retries = {k: v - retries_before.get(k, 0.0) for k, v in router_retries(cluster).items()}
    goodput = loaded.tokens_per_s() / unloaded.tokens_per_s() if unloaded.tokens_per_s() else 0.0
    summary = {
        "unloaded": {"clients": unloaded.clients, "seconds": round(unloaded.seconds, 1), "completed": unloaded.completed,
                     "tokens_per_s": round(unloaded.tokens_per_s(), 1), "errors": len(unloaded.errors)},
        "loaded": {"clients": loaded.clients, "seconds": round(loaded.seconds, 1), "completed": loaded.completed,
                   "tokens_per_s": round(loaded.tokens_per_s(), 1), "errors": len(loaded.errors),
                   "inexact": loaded.inexact, "peak_waiting": peaks},
        "retries": {k: v for k, v in retries.items() if v}, "goodput": round(goodput, 3),
        "first_errors": (unloaded.errors + loaded.errors)[:3],
    }
    ok = (not summary["retries"] and not loaded.errors and not unloaded.errors and loaded.inexact == 0
          and unloaded.inexact == 0 and goodput >= args.min_goodput)
    summary["ok"] = ok
    print(f"unloaded ({unloaded.clients} clients): {unloaded.tokens_per_s():.1f} tok/s; loaded "
          f"({loaded.clients} clients, peak waiting {peaks}): {loaded.tokens_per_s():.1f} tok/s, "
          f"{loaded.completed} completed, goodput {goodput:.1%}, retries {summary['retries'] or 0}, "
          f"errors {len(loaded.errors)}, inexact {loaded.inexact}")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
