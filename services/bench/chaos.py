"""Fault injection against a live local cluster: streams through the router while servers are
killed with SIGKILL, then checks what the clients got against a fault-free run.

    python -m pdserve.bench.chaos kill --rounds 20     # kill -9 a decode or prefill server mid-stream
    python -m pdserve.bench.chaos churn --requests 2000 # cancellations + kills, then leak checks

The tests drive the same functions (tests/integration/test_failover.py) at a small scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import grpc

from pdserve.cli.cluster import LocalCluster
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc


@dataclass
class StreamResult:
    """What one client stream received: tokens, text, finish reason, or the error status name."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None


class ProgressWatch:
    """Counts tokens and first tokens received across streams; lets a coroutine wait for a count."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first_tokens = 0
        self._waiters: list[tuple[str, int, asyncio.Future]] = []

    def add(self, tokens: int, first: bool) -> None:
        """A chunk of `tokens` tokens arrived (first: the stream's first)."""
        self.tokens += tokens
        self.first_tokens += first
        for waiter in [w for w in self._waiters if getattr(self, w[0]) >= w[1]]:
            self._waiters.remove(waiter)
            if not waiter[2].done():
                waiter[2].set_result(None)

    async def reached(self, what: str, count: int) -> None:
        """Return once `what` ("tokens" or "first_tokens") is at least `count`."""
        if getattr(self, what) >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((what, count, future))
        await future


def greedy_request(prompt: list[int], max_tokens: int, request_id: str = "") -> router_pb2.GenerateRequest:
    """A greedy GenerateRequest for exactly max_tokens tokens (EOS ignored)."""
    return router_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=router_pb2.TokenIds(ids=prompt),
                                      sampling=router_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                         ignore_eos=True))


async def stream_one(stub: router_pb2_grpc.RouterStub, request: router_pb2.GenerateRequest,
                     watch: ProgressWatch | None = None, cancel_after: int | None = None,
                     timeout_s: float = 300.0) -> StreamResult:
    """Run one Generate stream (sample 0 only); with cancel_after, the client cancels once it
    holds that many tokens (finish "cancelled")."""
    result = StreamResult()
    call = stub.Generate(request, timeout=timeout_s)
    try:
        async for response in call:
            if response.HasField("chunk"):
                if watch is not None:
                    watch.add(len(response.chunk.token_ids), first=not result.tokens)
                result.tokens += response.chunk.token_ids
                result.text += response.chunk.text
                if cancel_after is not None and len(result.tokens) >= cancel_after:
                    call.cancel()
                    result.finish = "cancelled"
                    return result
            else:
                result.finish = response.complete.finish_reason
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    return result


@dataclass
class RoundReport:
    """One kill round: how many of the streams completed and matched the fault-free run."""

    role: str
    killed: str
    streams: int
    completed: int
    identical: int
    extra_tokens: int  # tokens beyond the fault-free run's (a repeated token would show here)
    errors: list[str]
    seconds: float


async def run_streams(cluster: LocalCluster, prompts: list[list[int]], max_tokens: int,
                      watch: ProgressWatch | None = None, cancel_after: list[int | None] | None = None
                      ) -> list[StreamResult]:
    """All prompts as concurrent greedy streams through the cluster's router."""
    cancel_after = cancel_after or [None] * len(prompts)
    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        return await asyncio.gather(*(stream_one(stub, greedy_request(p, max_tokens), watch, c)
                                      for p, c in zip(prompts, cancel_after)))


async def streams_killed_midway(cluster: LocalCluster, prompts: list[list[int]], max_tokens: int,
                                kill: Callable[[], None], share: int = 4) -> list[StreamResult]:
    """Stream every prompt at once (greedy, max_tokens each) and call kill() once 1/share of all their tokens
    have reached the client; returns the streams' results."""
    watch = ProgressWatch()
    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        streams = asyncio.gather(*(stream_one(stub, greedy_request(p, max_tokens), watch) for p in prompts))
        await watch.reached("tokens", len(prompts) * max_tokens // share)
        kill()
        return await streams


async def kill_round(cluster: LocalCluster, prompts: list[list[int]], max_tokens: int, reference: list[list[int]],
                     role: str, rng: random.Random, replace: bool = True) -> RoundReport:
    """Stream every prompt at once and SIGKILL a server of `role` at a random point: once its
    role's servers have finished a random number of requests (up to half of them for decode and
    colocated servers, a third for prefill), the busiest of them while it holds requests. The
    trigger reads the servers' own counters, so a slow client cannot make it miss the work.
    Then (replace) start a new server of that role."""
    started = time.monotonic()
    baseline = sum(load.num_finished_requests for _, load in await _loads_of(cluster, role))
    streams = asyncio.ensure_future(run_streams(cluster, prompts, max_tokens))
    share = 3 if role == "prefill" else 2
    victim = await _busy_server(cluster, role, baseline + rng.randrange(len(prompts) // share), rng)
    cluster.kill(victim)
    results = await streams
    seconds = time.monotonic() - started
    if replace:
        await asyncio.to_thread(cluster.add_server, role)
    return RoundReport(
        role=role, killed=victim.log_path.stem, streams=len(prompts),
        completed=sum(r.finish == "length" for r in results),
        identical=sum(r.tokens == want for r, want in zip(results, reference)),
        extra_tokens=sum(max(0, len(r.tokens) - len(want)) for r, want in zip(results, reference)),
        errors=[r.error for r in results if r.error], seconds=seconds)


async def _loads_of(cluster: LocalCluster, role: str) -> list[tuple]:
    """(ServerProcess, GetLoad) of every ready server of `role`."""
    loads = []
    for proc in cluster.servers(role):
        async with cluster.aio_channel(proc.address, with_api_key=False) as channel:
            stub = worker_pb2_grpc.WorkerControlStub(channel)
            loads.append((proc, await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)))
    return loads


async def _busy_server(cluster: LocalCluster, role: str, finished_at_least: int, rng: random.Random,
                       timeout_s: float = 60.0):
    """Poll the servers of `role` until they finished `finished_at_least` requests in all and one
    of them holds requests (running, waiting or reserved); return the one holding the most (ties
    at random). After timeout_s, the busiest whatever its load."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = await _loads_of(cluster, role)
        held = [(proc, l.num_running_requests + l.num_waiting_requests + l.num_reservations) for proc, l in loads]
        finished = sum(l.num_finished_requests for _, l in loads)
        most = max(h for _, h in held)
        if (most > 0 and finished >= finished_at_least) or time.monotonic() > deadline:
            return rng.choice([proc for proc, h in held if h == most])
        await asyncio.sleep(0.005)  # the trigger's polling interval


async def worker_loads(cluster: LocalCluster) -> dict[str, worker_pb2.WorkerLoad]:
    """GetLoad of every live prefill/decode/colocated server, by log name."""
    loads = {}
    for proc in cluster.processes:
        if proc.role in ("prefill", "decode", "colocated"):
            async with cluster.aio_channel(proc.address) as channel:
                stub = worker_pb2_grpc.WorkerControlStub(channel)
                loads[proc.log_path.stem] = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return loads


async def wait_all_blocks_free(cluster: LocalCluster, timeout_s: float = 30.0) -> dict[str, worker_pb2.WorkerLoad]:
    """Poll GetLoad until every live worker has all KV blocks free and no reservation (aborts
    land asynchronously), or the timeout; returns the last loads either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = await worker_loads(cluster)
        idle = all(l.num_blocks_free == l.num_blocks_total and l.num_reservations == 0
                   and l.num_running_requests == 0 for l in loads.values())
        if idle or time.monotonic() > deadline:
            return loads
        await asyncio.sleep(0.2)


def make_prompts(count: int, seed: int, vocab: int = 500) -> list[list[int]]:
    """`count` random prompts of 3-40 token ids in [2, vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(3, 40))] for _ in range(count)]


async def kill_rounds(cluster: LocalCluster, rounds: int, requests: int, max_tokens: int, seed: int) -> list[RoundReport]:
    """A fault-free reference run, then `rounds` kill rounds alternating decode and prefill."""
    rng = random.Random(seed)
    prompts = make_prompts(requests, seed)
    reference = [r.tokens for r in await run_streams(cluster, prompts, max_tokens)]
    reports = []
    for i in range(rounds):
        report = await kill_round(cluster, prompts, max_tokens, reference, ("decode", "prefill")[i % 2], rng)
        print(json.dumps(asdict(report)), flush=True)
        reports.append(report)
    return reports


def _cluster(args) -> LocalCluster:
    from pdserve.models.tiny_model import make_tiny_model

    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="pdserve-chaos-") + "/tiny",
                                                  arch="llama", seed=0))
    return LocalCluster(model_dir, prefill=args.prefill, decode=args.decode,
                        extra_args=["--max-num-seqs", "128"], env={"PDSERVE_KV_TRANSFER": args.kv_transfer})


def main(argv: list[str] | None = None) -> int:
    """CLI: kill rounds or churn; prints one JSON line per round and a summary."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["kill", "churn"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--cancel", type=float, default=0.2, help="churn: share of streams the client cancels")
    p.add_argument("--kills", type=int, default=10, help="churn: servers killed (and replaced) during the run")
    p.add_argument("--concurrency", type=int, default=64, help="churn: streams in flight at once")
    p.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-transfer", choices=("auto", "tcp", "nixl"), default="auto",
                   help="the servers' KV data path (churn then also checks their NIXL gauges)")
    args = p.parse_args(argv)
    with _cluster(args) as cluster:
        if args.mode == "kill":
            reports = asyncio.run(kill_rounds(cluster, args.rounds, args.requests, args.max_tokens, args.seed))
            ok = all(r.completed == r.identical == r.streams and r.extra_tokens == 0 for r in reports)
            print(f"SUMMARY rounds={len(reports)} streams={sum(r.streams for r in reports)} "
                  f"completed={sum(r.completed for r in reports)} identical={sum(r.identical for r in reports)} "
                  f"extra_tokens={sum(r.extra_tokens for r in reports)} ok={ok}")
        else:
            from pdserve.bench.chaos_churn import churn

            summary = asyncio.run(churn(cluster, args))
            print("SUMMARY " + json.dumps(summary))
            ok = summary["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
