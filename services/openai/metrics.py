"""Prometheus metrics of the front end, served on its own GET /metrics.

pdserve_openai_requests_total{endpoint,status}          counter
pdserve_openai_request_duration_seconds{endpoint}       histogram (whole request, streams included)
pdserve_openai_requests_in_flight                       gauge
pdserve_openai_prompt_tokens_total, ..._completion_tokens_total   counters

Each Metrics has its own CollectorRegistry, so several front ends in one process (tests) count
apart and none touches prometheus_client's global registry.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "pdserve_openai"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every pdserve /metrics serves


class Metrics:
    """The metrics a request updates, and `render()` for GET /metrics."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series, as in pdserve's other /metrics endpoints
        self.registry = CollectorRegistry()
        # prometheus_client appends `_total` to counter names.
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "Time from request to the end of the response (streams included).",
                                  ["endpoint"], buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being served now.",
                               registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Completion tokens of finished requests.",
                                         registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count a finished request and its duration."""
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def count_tokens(self, prompt: int, completion: int) -> None:
        """Add a request's usage."""
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format (served as CONTENT_TYPE)."""
        return generate_latest(self.registry)
