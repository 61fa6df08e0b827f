"""A server process's telemetry: the object that sets up logging, tracing and the metrics registry
at start (from its TelemetrySettings) and flushes them at exit.

    telemetry = ProcessTelemetry.start(settings.server.telemetry, "decode")  # logging + tracing
    WorkerMetrics(telemetry.registry) ...                  # the role adds its metrics
    telemetry.serve_metrics(settings.server)               # prints "METRICS decode host:port"
    ...
    telemetry.close()                                      # flush spans, stop /metrics
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from pdserve.telemetry.logs import configure_logging
from pdserve.telemetry.metrics import new_registry, start_metrics_server
from pdserve.telemetry.tracing import otlp_endpoint_from, setup_tracing, shutdown_tracing

if TYPE_CHECKING:
    from pdserve.settings import ServerSettings, TelemetrySettings

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
    def start(cls, settings: TelemetrySettings, role: str) -> ProcessTelemetry:
        """Configure logging and tracing; an empty registry for the metrics."""
        service = f"pdserve-{role}"
        configure_logging(service, settings.log_json, settings.log_level)
        tracing = setup_tracing(service, otlp_endpoint_from(settings.otlp_endpoint))
        return cls(role, new_registry(), tracing)

    def serve_metrics(self, server: ServerSettings) -> None:
        """Start /metrics when the server's telemetry has a metrics port, and print
        "METRICS <role> host:port"."""
        port = server.telemetry.metrics_port
        if port is None:
            return
        host = server.telemetry.metrics_host or server.host
        self.metrics_server, self.metrics_port = start_metrics_server(self.registry, host, port)
        shown = server.advertised_host() if host == server.host else host
        logger.info("%s metrics at http://%s:%d/metrics", self.role, shown, self.metrics_port)
        print(f"METRICS {self.role} {shown}:{self.metrics_port}", flush=True)

    def close(self) -> None:
        """Export the spans still buffered and stop the metrics server."""
        shutdown_tracing()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
