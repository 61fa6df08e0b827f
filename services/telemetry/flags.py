"""The telemetry and shutdown flags every `pdserve serve` role takes (no heavy imports here:
the CLI parser is built for every command)."""

from __future__ import annotations

import argparse

from pdserve.cli.env import add_flag

DEFAULT_DRAIN_TIMEOUT_S = 30.0


def add_telemetry_flags(parser: argparse.ArgumentParser) -> None:
    """--otlp-endpoint, --metrics-port, --metrics-host, --log-json, --log-level and
    --drain-timeout-s (each also read from its PDSERVE_* variable)."""
    add_flag(parser, "--otlp-endpoint", None, str,
             "OTLP/gRPC collector for traces, host:port or http://host:port (default: "
             "$OTEL_EXPORTER_OTLP_ENDPOINT; neither set: tracing off)")
    add_flag(parser, "--metrics-port", None, int,
             "serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; unset: off)")
    add_flag(parser, "--metrics-host", None, str, "address the metrics server listens on (default: --host)")
    add_flag(parser, "--log-json", False, bool, "log one JSON object per line (with request and trace ids)")
    add_flag(parser, "--log-level", "INFO", str, "DEBUG, INFO, WARNING or ERROR")
    add_flag(parser, "--drain-timeout-s", DEFAULT_DRAIN_TIMEOUT_S, float,
             "on SIGTERM: seconds to finish in-flight requests before exiting (a second signal: at once)")
