"""A small OTLP/gRPC trace receiver that keeps the spans it is sent: for tests and benchmarks
where no OpenTelemetry collector runs (it speaks the collector's TraceService, so pdserve's
exporter cannot tell the difference).

    sink = OTLPTraceSink.start()                 # in-process, on a free loopback port
    ... run servers with --otlp-endpoint sink.endpoint ...
    spans = sink.wait_for(lambda spans: len(spans) >= 8, timeout_s=10)
    sink.stop()

    python -m pdserve.telemetry.otlp_sink [--port P]   # as a process: prints "READY host:port",
                                                        # and the span count on SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

MAX_EXPORT_BYTES = 32 * 2**20  # one OTLP export request at most
KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span: ids in hex (parent_span_id "" for a root), service.name of the
    process that sent it, kind name, Unix-ns times, attributes, and status code (2 = ERROR)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    status_code: int = 0


def any_value(value: AnyValue):
    """The Python value of an OTLP AnyValue (arrays as lists)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Flatten an export request into ReceivedSpans."""
    out = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(ReceivedSpan(
                    service=str(resource.get("service.name", "")), name=span.name,
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), kind=KIND_NAMES.get(span.kind, str(span.kind)),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                    status_code=span.status.code))
    return out


class OTLPTraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    """opentelemetry.proto.collector.trace.v1.TraceService keeping every span (thread-safe).
    keep=False only counts them (a benchmark's collector)."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.count = 0
        self.server: grpc.Server | None = None
        self.endpoint = ""
        self._cond = threading.Condition()

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, keep: bool = True) -> OTLPTraceSink:
        """Serve on host:port (0: a free port); `endpoint` is then "host:port"."""
        sink = cls(keep)
        sink.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),  # OTLP batches: 4 MiB is tight
                                  options=[("grpc.max_receive_message_length", MAX_EXPORT_BYTES)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, sink.server)
        bound = sink.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        sink.server.start()
        sink.endpoint = f"{host}:{bound}"
        return sink

    def Export(self, request, context):
        """Keep (or only count, without decoding them) the request's spans."""
        if self.keep:
            received = spans_of(request)
            count = len(received)
        else:
            count = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._cond:
            self.count += count
            if self.keep:
                self.spans.extend(received)
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> list[ReceivedSpan]:
        """Block until done(spans) holds (re-checked at every export); returns the spans.
        TimeoutError naming what arrived when it does not hold in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not done(list(self.spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({f"{s.service}:{s.name}" for s in self.spans})
                    raise TimeoutError(f"spans not complete after {timeout_s} s; got {len(self.spans)}: {names}")
                self._cond.wait(left)
            return list(self.spans)

    def stop(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.stop(grace=None)


def main(argv: list[str] | None = None) -> int:
    """Run a counting sink until SIGTERM/SIGINT; prints READY host:port, then SPANS n."""
    parser = argparse.ArgumentParser(description="a minimal OTLP/gRPC trace receiver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    sink = OTLPTraceSink.start(args.host, args.port, keep=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"READY {sink.endpoint}", flush=True)
    stop.wait()
    sink.stop()
    print(f"SPANS {sink.count}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
