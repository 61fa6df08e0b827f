"""Observability for every pdserve process: OpenTelemetry traces (exported over OTLP), Prometheus
metrics at /metrics, and structured logs that carry trace and request ids.

tracing: the tracer, W3C trace-context carriers (gRPC metadata, proto fields, KV handshake);
spans: span names and `gen_ai.*` attribute names; metrics: the metric families and buckets;
engine_collector: engine gauges/counters read at scrape time; logs: JSON logging; flags: the
`serve` flags (--otlp-endpoint, --metrics-port, --log-json, --drain-timeout-s, ...); process:
the one object a server builds at start; otlp_sink: a small OTLP receiver for tests and
benchmarks.
"""
