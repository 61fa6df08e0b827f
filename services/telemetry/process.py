"""A server process's telemetry: its flags, and the object that sets up logging, tracing and the
metrics registry at start and flushes them at exit.

    telemetry = ProcessTelemetry.start(ns, "decode")      # logging + tracing, empty registry
    WorkerMetrics(telemetry.registry) ...                  # the role adds its metrics
    telemetry.serve_metrics(ns)                            # prints "METRICS decode host:port"
    ...
    telemetry.close()                                      # flush spans, stop /metrics
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from pdserve.runtime.server import advertised_host
from pdserve.telemetry.logs import configure_logging
from pdserve.telemetry.metrics import new_registry, start_metrics_server
from pdserve.telemetry.tracing import otlp_endpoint_from, setup_tracing, shutdown_tracing

logger = logging.getLogger("pdserve.telemetry")


@dataclass
class ProcessTelemetry:
    """Logging, tracing and the metrics registry of one server process."""

    role: str
    registry: CollectorRegistry
    tracing: bool
    metrics_server: object | None = None
    metrics_port: int | None = None

    @classmethod
    def start(cls, ns: argparse.Namespace, role: str) -> ProcessTelemetry:
        """Configure logging and tracing from the flags; an empty registry for the metrics."""
        service = f"pdserve-{role}"
        configure_logging(service, bool(getattr(ns, "log_json", False)), getattr(ns, "log_level", None) or "INFO")
        tracing = setup_tracing(service, otlp_endpoint_from(getattr(ns, "otlp_endpoint", None)))
        return cls(role, new_registry(), tracing)

    def serve_metrics(self, ns: argparse.Namespace) -> None:
        """Start /metrics when --metrics-port is set and print "METRICS <role> host:port"."""
        port = getattr(ns, "metrics_port", None)
        if port is None:
            return
        if port < 0 or port > 65535:
            raise ValueError(f"--metrics-port {port} is not a port number (0-65535)")
        host = getattr(ns, "metrics_host", None) or ns.host
        self.metrics_server, self.metrics_port = start_metrics_server(self.registry, host, port)
        shown = advertised_host(ns) if host == ns.host else host
        logger.info("%s metrics at http://%s:%d/metrics", self.role, shown, self.metrics_port)
        print(f"METRICS {self.role} {shown}:{self.metrics_port}", flush=True)

    def close(self) -> None:
        """Export the spans still buffered and stop the metrics server."""
        shutdown_tracing()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
