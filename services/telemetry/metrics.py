"""Prometheus metrics of the router and the workers, in the style of vLLM's (`pdserve:` prefix,
seconds, `_total` counters, the same bucket boundaries), and the /metrics HTTP server.

Every process keeps its own CollectorRegistry (the process_* / python_* collectors included);
request-level histograms and counters are updated as requests run (a few microseconds each),
engine gauges are read from the engine's latest snapshot only when scraped.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

# vLLM's boundaries: time to first token, inter-token latency, request latency.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Queue and prefill times start at a millisecond: on a lightly loaded server they are that short.
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25) + REQUEST_LATENCY_BUCKETS
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def new_registry() -> CollectorRegistry:
    """A registry with the process and platform collectors (and no `_created` series)."""
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class RouterMetrics:
    """What the router sees of each request: latencies as the client sees them, tokens, and
    completions by finish reason (one per sample)."""

    def __init__(self, registry: CollectorRegistry):
        self.time_to_first_token = Histogram(
            "pdserve:time_to_first_token_seconds", "Time from a Generate call to its first token.",
            buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "pdserve:inter_token_latency_seconds", "Time between successive token chunks of a sample.",
            buckets=ITL_BUCKETS, registry=registry)
        self.e2e_request_latency = Histogram(
            "pdserve:e2e_request_latency_seconds", "Time from a Generate call to its last response.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.request_prompt_tokens = Histogram(
            "pdserve:request_prompt_tokens", "Prompt length of requests.", buckets=TOKEN_COUNT_BUCKETS,
            registry=registry)
        self.request_generation_tokens = Histogram(
            "pdserve:request_generation_tokens", "Tokens generated per request (all samples).",
            buckets=TOKEN_COUNT_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens of served requests.",
                                     registry=registry)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens streamed to clients.",
                                         registry=registry)
        self.request_success = Counter(
            "pdserve:request_success", "Completed samples by finish reason (stop, length, abort).",
            ["finished_reason"], registry=registry)
        self.request_failure = Counter(
            "pdserve:request_failure", "Generate calls that ended with an error, by gRPC status code.",
            ["code"], registry=registry)
        self.requests_in_flight = Gauge("pdserve:router_requests_in_flight",
                                        "Generate calls being served.", registry=registry)
        self.retries = Counter(
            "pdserve:router_retries", "Attempts of a request retried elsewhere, by the failure's cause "
            "(a gRPC status name such as UNAVAILABLE, or WorkerFailedError: a stream silent too long or "
            "ended early; OverloadedError: a started stream waiting for room).", ["reason"], registry=registry)
        self.routing_decisions = Counter(
            "pdserve:router_routing_decisions", "Workers chosen for requests, by role and reason (cache: it "
            "holds the most of the prompt; load: no worker holds any (or --routing load); load_over_cache: "
            "one holding more was busier).", ["role", "reason"], registry=registry)


class WorkerMetrics:
    """What a worker measures per request: time in the engine's queue, prefill time, KV
    transfers (bytes, count, latency; direction "sent" on prefill, "received" on decode) and
    requests by finish reason (decode and colocated workers)."""

    def __init__(self, registry: CollectorRegistry):
        self.queue_time = Histogram(
            "pdserve:request_queue_time_seconds",
            "Time a request waited in the engine's queue before it was first scheduled.",
            buckets=QUEUE_BUCKETS, registry=registry)
        self.prefill_time = Histogram(
            "pdserve:request_prefill_time_seconds", "Time from first scheduled to the first token.",
            buckets=QUEUE_BUCKETS, registry=registry)
        self.kv_transfer_bytes = Counter(
            "pdserve:kv_transfer_bytes", "KV cache payload bytes moved between servers, by data path (tcp, nixl).",
            ["direction", "data_path"], registry=registry)
        self.kv_transfers = Counter(
            "pdserve:kv_transfers", "KV transfers by direction, data path (tcp, nixl) and outcome (ok, error).",
            ["direction", "data_path", "outcome"], registry=registry)
        self.kv_transfer_duration = Histogram(
            "pdserve:kv_transfer_duration_seconds",
            "Time of a KV transfer (sender: open to confirmed; receiver: handshake to complete).",
            ["direction", "data_path"], buckets=KV_TRANSFER_BUCKETS, registry=registry)
        self.request_success = Counter(
            "pdserve:request_success", "Samples this worker finished, by finish reason.",
            ["finished_reason"], registry=registry)
        self.kv_reserved_blocks = Counter(
            "pdserve:kv_reserved_blocks", "Prompt KV blocks of the reservations a decode server granted: "
            "source transferred (the prefill server sends them) or held (already in this server's prefix "
            "cache: skipped by the transfer).", ["source"], registry=registry)

    def observe_transfer(self, direction: str, num_bytes: int, seconds: float, ok: bool,
                         data_path: str) -> None:
        """Count one KV transfer (data_path: "tcp" or "nixl"; a transfer that failed before its
        handshake agreed on one counts under the one this server offered)."""
        self.kv_transfers.labels(direction, data_path, "ok" if ok else "error").inc()
        if ok:
            self.kv_transfer_bytes.labels(direction, data_path).inc(num_bytes)
            self.kv_transfer_duration.labels(direction, data_path).observe(seconds)


    def observe_reserved_blocks(self, transferred: int, held: int) -> None:
        """Count a granted reservation's prompt blocks: to be transferred, and held already."""
        self.kv_reserved_blocks.labels("transferred").inc(transferred)
        self.kv_reserved_blocks.labels("held").inc(held)


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Serve the registry as Prometheus text at http://host:port/metrics (any path, in fact)
    from a daemon thread; returns (server, bound port). port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
