"""`pdserve bench serve`: load a running deployment through its router and report TTFT, TPOT,
ITL, end-to-end latency, throughput and goodput (the library half; flags live in cli_bench)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, field

from pdserve.bench.serve_arrivals import arrival_offsets
from pdserve.bench.serve_client import LoadSpec, run_load
from pdserve.bench.serve_datasets import BenchRequest
from pdserve.bench.serve_metrics import RequestRecord, ServeMetrics, compute_metrics, run_duration
from pdserve.runtime.channels import PLAINTEXT, ClientSecurity


@dataclass(frozen=True)
class ServeSettings:
    """How the load is offered.

    request_rate: mean requests per second (inf: all at once); burstiness: gamma shape of the gaps
    (1 = Poisson); max_concurrency: cap on requests in flight (None: no cap); warmup: short
    requests sent first and not counted; seed: arrival times and per-request sampling seeds.
    """

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    temperature: float = 0.0
    seed: int = 0
    warmup: int = 0
    timeout_s: float = 600.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        arrival_offsets(0, self.request_rate, self.burstiness)  # validates rate and burstiness

    def as_dict(self) -> dict:
        """JSON-ready settings (an infinite rate written as the string "inf")."""
        out = asdict(self)
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return out


@dataclass
class ServeRun:
    """One benchmark run: every request's record and the figures made from them."""

    records: list[RequestRecord]
    metrics: ServeMetrics
    errors: dict[str, int] = field(default_factory=dict)


def warmup_requests(requests: list[BenchRequest], count: int) -> list[BenchRequest]:
    """count short requests (4 output tokens) whose prompts are a workload prompt's last 16 tokens
    reversed: in the vocabulary, yet sharing no prefix-cache block with the workload's prompts."""
    return [BenchRequest(requests[i % len(requests)].prompt_token_ids[::-1][:16], 4) for i in range(count)]


def run_async(coroutine):
    """Run a coroutine on uvloop when it is there (the services' loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def run_serve(address: str, requests: list[BenchRequest], settings: ServeSettings,
              slos: dict[str, float] | None = None, security: ClientSecurity = PLAINTEXT) -> ServeRun:
    """Warm up, send the workload on its schedule, and compute the figures (slos in seconds);
    security: TLS and the API key to dial the router with."""
    if not requests:
        raise ValueError("the workload has no requests")
    if settings.warmup:
        warm = warmup_requests(requests, settings.warmup)
        run_async(run_load(address, warm, LoadSpec(offsets=(0.0,) * len(warm), progress=False), 0, security))
    offsets = arrival_offsets(len(requests), settings.request_rate, settings.burstiness, settings.seed)
    load = LoadSpec(tuple(offsets), settings.max_concurrency, settings.temperature, settings.timeout_s,
                    settings.progress)
    records = run_async(run_load(address, requests, load, settings.seed, security))
    return serve_run(records, slos)


def serve_run(records: list[RequestRecord], slos: dict[str, float] | None = None) -> ServeRun:
    """A run's figures (slos in seconds) and its errors counted by message."""
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return ServeRun(records, compute_metrics(records, run_duration(records), slos), errors)
