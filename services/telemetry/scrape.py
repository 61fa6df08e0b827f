"""Reading a server's Prometheus /metrics back (benchmarks and tests compare counters before and after)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape_metrics(address: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Every sample at http://address/metrics, keyed "name{label=value,...}" (labels sorted; no braces
    when a sample has no label)."""
    return parse_metrics(urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s).read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as samples keyed like scrape_metrics."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
