"""Reading a server's Prometheus /metrics back (benchmarks and tests compare counters before and after)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape_metrics(address: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Every sample at http://address/metrics, keyed "name{label=value,...}" (labels sorted; no braces
    when a sample has no label)."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
