"""Prometheus metrics of the front end, kept in process and written in the text format.

pdserve_openai_requests_total{endpoint,status}          counter
pdserve_openai_request_duration_seconds{endpoint}       histogram (whole request, streams included)
pdserve_openai_requests_in_flight                       gauge
pdserve_openai_prompt_tokens_total, ..._completion_tokens_total   counters
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "pdserve_openai"


@dataclass
class Histogram:
    """Cumulative-bucket histogram of one label set."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(DURATION_BUCKETS_S, value)] += 1
        self.total += value


@dataclass
class Metrics:
    """The counters a request updates and `render()` for GET /metrics."""

    requests: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    durations: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count a finished request and its duration."""
        self.requests[(endpoint, status)] += 1
        self.durations[endpoint].observe(seconds)

    def count_tokens(self, prompt: int, completion: int) -> None:
        """Add a request's usage."""
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines = [f"# HELP {PREFIX}_requests_total HTTP requests by endpoint and status code.",
                 f"# TYPE {PREFIX}_requests_total counter"]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'{PREFIX}_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        name = f"{PREFIX}_request_duration_seconds"
        lines += [f"# HELP {name} Time from request to the end of the response (streams included).",
                  f"# TYPE {name} histogram"]
        for endpoint, hist in sorted(self.durations.items()):
            cumulative = 0
            for bound, count in zip([*map(str, DURATION_BUCKETS_S), "+Inf"], hist.counts):
                cumulative += count
                lines.append(f'{name}_bucket{{endpoint="{endpoint}",le="{bound}"}} {cumulative}')
            lines.append(f'{name}_sum{{endpoint="{endpoint}"}} {hist.total}')
            lines.append(f'{name}_count{{endpoint="{endpoint}"}} {cumulative}')
        lines += [f"# HELP {PREFIX}_requests_in_flight Requests being served now.",
                  f"# TYPE {PREFIX}_requests_in_flight gauge", f"{PREFIX}_requests_in_flight {self.in_flight}"]
        for kind, value in (("prompt", self.prompt_tokens), ("completion", self.completion_tokens)):
            lines += [f"# HELP {PREFIX}_{kind}_tokens_total {kind.capitalize()} tokens of finished requests.",
                      f"# TYPE {PREFIX}_{kind}_tokens_total counter", f"{PREFIX}_{kind}_tokens_total {value}"]
        return "\n".join(lines) + "\n"
