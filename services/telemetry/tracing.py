"""OpenTelemetry tracing: one tracer per process, exporting over OTLP/gRPC when an endpoint is
configured, and a no-op tracer otherwise (nothing is built or sent: `enabled()` is False, the
spans are the shared invalid span, and carriers are empty).

Trace context travels as W3C `traceparent` / `tracestate`: in gRPC metadata and in the internal
protos' `trace_context` map fields (servers read the field first, then the metadata), and in the
KV transfer handshake's `metadata`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger("pdserve.telemetry")

TRACER_NAME = "pdserve"
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP_TRACER = trace.NoOpTracer()


class _State:
    """The process's tracer provider (None: tracing off) and tracer."""

    provider = None
    tracer: trace.Tracer = _NOOP_TRACER


def otlp_endpoint_from(flag_value: str | None) -> str | None:
    """The OTLP endpoint: the flag, else $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    $OTEL_EXPORTER_OTLP_ENDPOINT; None (tracing off) when none is set or it is empty."""
    for value in (flag_value, os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                  os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        if value and value.strip():
            return value.strip()
    return None


def setup_tracing(service_name: str, endpoint: str | None, span_exporter=None) -> bool:
    """Turn tracing on for this process, exporting to `endpoint` ("host:port" or
    "http(s)://host:port", OTLP over gRPC) or to `span_exporter` (an SDK SpanExporter, e.g. an
    in-memory one). Returns False, leaving the no-op tracer, when neither is given.
    $OTEL_SERVICE_NAME overrides service_name; $OTEL_TRACES_SAMPLER and the $OTEL_BSP_*
    batching variables apply as the SDK reads them."""
    if endpoint is None and span_exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if span_exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        url = endpoint if "://" in endpoint else f"http://{endpoint}"
        span_exporter = OTLPSpanExporter(endpoint=url)
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    shutdown_tracing()
    _State.provider = provider
    _State.tracer = provider.get_tracer(TRACER_NAME)
    logger.info("tracing on: service %s exporting to %s", name, endpoint or type(span_exporter).__name__)
    return True


def shutdown_tracing(timeout_ms: int = 5000) -> None:
    """Flush the spans not yet exported and turn tracing off (idempotent)."""
    provider, _State.provider, _State.tracer = _State.provider, None, _NOOP_TRACER
    if provider is not None:
        provider.force_flush(timeout_ms)
        provider.shutdown()


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered now (tests, benchmarks)."""
    if _State.provider is not None:
        _State.provider.force_flush(timeout_ms)


def enabled() -> bool:
    """True when spans are recorded and exported."""
    return _State.provider is not None


def tracer() -> trace.Tracer:
    """The process's tracer (a no-op one while tracing is off)."""
    return _State.tracer


def extract(carrier: Mapping[str, str] | None) -> Context | None:
    """The remote parent context a W3C carrier holds; None when tracing is off or the
    carrier has no valid traceparent."""
    if not carrier or _State.provider is None:
        return None
    context = _PROPAGATOR.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def carrier_from_grpc(grpc_context) -> dict[str, str]:
    """traceparent / tracestate from a servicer context's invocation metadata."""
    if _State.provider is None or grpc_context is None:
        return {}
    return {key: value for key, value in (grpc_context.invocation_metadata() or ())
            if key in TRACE_HEADERS}


def parent_from(field_carrier: Mapping[str, str] | None, grpc_context=None) -> Context | None:
    """The parent of a server span: the proto's trace_context field, else the gRPC metadata."""
    if _State.provider is None:
        return None
    return extract(field_carrier) or extract(carrier_from_grpc(grpc_context))


def inject(span: trace.Span) -> dict[str, str]:
    """A W3C carrier naming `span` as parent ({} when the span is not recorded)."""
    if not span.is_recording():
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def grpc_metadata(carrier: Mapping[str, str]) -> tuple[tuple[str, str], ...] | None:
    """gRPC call metadata carrying the carrier (None when it is empty)."""
    return tuple(carrier.items()) or None


def child_context(span: trace.Span) -> Context:
    """The context whose current span is `span` (to start a child explicitly)."""
    return trace.set_span_in_context(span)


def trace_ids(span: trace.Span) -> tuple[str, str] | None:
    """(trace id, span id) in hex of a recorded span, for logs; None otherwise."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
