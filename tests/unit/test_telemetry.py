"""Telemetry parts in one process: tracing on and off, W3C carriers, the OTLP receiver, JSON
logs, engine metrics, the KV receiver's transfer reports, and draining."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import grpc
import pytest
import torch
from prometheus_client import generate_latest

from pdserve.engine.stats import EngineCounters, EngineStats
from pdserve.kvtransfer import KVLayout, TCPKVReceiver, TCPKVSender
from pdserve.runtime.lifecycle import DRAINING_DETAILS, DrainingError, Lifecycle, is_draining_refusal
from pdserve.telemetry import spans, tracing
from pdserve.telemetry.engine_collector import EngineStatsCollector
from pdserve.telemetry.logs import (
    TRACEBACK_INDENT,
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    bind_request,
    configure_logging,
)
from pdserve.telemetry.metrics import RouterMetrics, new_registry
from pdserve.telemetry.otlp_sink import OTLPTraceSink
from pdserve.telemetry.scrape import parse_metrics


@pytest.fixture
def sink():
    """A real OTLP/gRPC receiver, and tracing on in this process exporting to it."""
    receiver = OTLPTraceSink.start()
    tracing.setup_tracing("pdserve-test", receiver.endpoint)
    yield receiver
    tracing.shutdown_tracing()
    receiver.stop()


def test_tracing_off_builds_nothing():
    tracing.shutdown_tracing()
    assert not tracing.enabled()
    span = spans.start(spans.ROUTER_GENERATE, None)
    assert not span.is_recording()
    assert tracing.inject(span) == {}
    assert tracing.extract({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}) is None
    spans.record(spans.QUEUE, span, 0, 1, {"x": 1})  # a no-op, no error


def test_spans_cross_carriers_and_reach_the_otlp_receiver(sink):
    root = spans.start(spans.ROUTER_GENERATE, None)
    carrier = tracing.inject(root)
    assert set(carrier) == {"traceparent"}
    server = spans.start(spans.PREFILL, tracing.parent_from(carrier))  # as a worker would
    kv = spans.start(spans.KV_TRANSFER, server)
    receive = spans.start(spans.KV_RECEIVE, tracing.extract(tracing.inject(kv)))  # the handshake
    receive.set_attributes({spans.PDSERVE_KV_BYTES: 4096})
    spans.record(spans.QUEUE, server, spans.now_ns() - 1000, spans.now_ns(), {spans.GEN_AI_LATENCY_QUEUE: 1e-6})
    for span in (receive, kv, server):
        span.end()
    spans.end_with_error(root, ValueError("bad"))
    tracing.flush()
    got = {s.name: s for s in sink.wait_for(lambda s: len(s) >= 5, timeout_s=20)}
    assert len({s.trace_id for s in got.values()}) == 1
    assert got[spans.ROUTER_GENERATE].parent_span_id == ""
    assert got[spans.ROUTER_GENERATE].status_code == 2  # ERROR
    assert got[spans.PREFILL].parent_span_id == got[spans.ROUTER_GENERATE].span_id
    assert got[spans.KV_TRANSFER].parent_span_id == got[spans.PREFILL].span_id
    assert got[spans.KV_RECEIVE].parent_span_id == got[spans.KV_TRANSFER].span_id
    assert got[spans.QUEUE].parent_span_id == got[spans.PREFILL].span_id
    assert got[spans.KV_RECEIVE].attributes[spans.PDSERVE_KV_BYTES] == 4096
    assert got[spans.KV_RECEIVE].service == "pdserve-test"


def test_a_decode_span_says_what_its_request_speculated(sink):
    from pdserve.engine.outputs import RequestOutput, SampleOutput
    from pdserve.telemetry.metrics import WorkerMetrics
    from pdserve.workers.request_trace import WorkerRequestTrace

    async def rpc():  # the request binding stays in the RPC's task, as in a worker
        trace = WorkerRequestTrace(spans.DECODE, "req-spec", None, None, WorkerMetrics(new_registry()), "decode",
                                   "d0", forward=False)
        for proposed, accepted in ((4, 3), (8, 5), (0, 0)):  # cumulative; an output without speculation keeps them
            trace.on_output(RequestOutput("req-spec", [SampleOutput(0, [7])], 12, 0, False, 0.001, proposed, accepted))
        trace.end(None, {spans.GEN_AI_USAGE_COMPLETION_TOKENS: 3})

    asyncio.run(rpc())
    tracing.flush()
    (span,) = [s for s in sink.wait_for(lambda got: any(s.name == spans.DECODE for s in got), timeout_s=20)
               if s.name == spans.DECODE]
    assert span.attributes[spans.PDSERVE_SPECULATIVE_PROPOSED] == 8
    assert span.attributes[spans.PDSERVE_SPECULATIVE_ACCEPTED] == 5


def _json_logger(name: str, service: str) -> tuple[logging.Logger, io.StringIO]:
    """A logger writing pdserve's JSON lines (request context included) into the returned buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter(service))
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.propagate = False
    return log, stream


def test_json_logs_carry_request_and_trace_ids(sink):
    span = spans.start(spans.DECODE, None)
    log, stream = _json_logger("pdserve.test.json", "pdserve-decode")

    async def request_task():  # each RPC runs in its own task: the binding stays there
        bind_request("req-7", span)
        log.warning("decoding %d tokens", 3)

    asyncio.run(request_task())
    log.warning("no request here")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    trace_id, span_id = tracing.trace_ids(span)
    assert first == {**first, "message": "decoding 3 tokens", "request_id": "req-7", "trace_id": trace_id,
                     "span_id": span_id, "service": "pdserve-decode", "level": "WARNING"}
    assert "request_id" not in second and second["message"] == "no request here"
    span.end()


FORGED = "2030-01-01 00:00:00,000 pdserve.router INFO FORGED"
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _text_log(emit) -> str:
    """What `emit(log)` writes through the text format of configure_logging."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(TextFormatter())
    log = logging.getLogger("pdserve.test.text")
    log.addHandler(handler)
    log.propagate = False
    try:
        emit(log)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_text_logs_escape_control_characters_so_no_client_text_starts_a_line():
    async def request_task(log: logging.Logger):  # a request id with a line break, bound as a servicer binds it
        bind_request(f"ok\n{FORGED}")
        log.warning("request %s: %s", f"a\r\n{FORGED}", f"b\u2028{FORGED}\x1b[2K\x85{FORGED}\ttab\x00")
        try:
            raise ValueError(f"bad id\n{FORGED}\r{FORGED}")
        except ValueError:
            log.exception("failed %s", f"c\n{FORGED}")

    text = _text_log(lambda log: asyncio.run(request_task(log)))
    lines = text.splitlines()  # splits at \r, \x85, \u2028 too, as some log viewers do
    records = [line for line in lines if RECORD_START.match(line)]
    assert len(records) == 2, text
    assert all(RECORD_START.match(line) or line.startswith(TRACEBACK_INDENT) for line in lines), text
    assert not any(line.startswith(FORGED) for line in lines), text
    assert records[0].endswith(f"request a\\r\\n{FORGED}: b\\u2028{FORGED}\\x1b[2K\\x85{FORGED}\\ttab\\x00 "
                               f"[request_id=ok\\n{FORGED}]"), records[0]
    assert records[1].endswith(f"failed c\\n{FORGED} [request_id=ok\\n{FORGED}]"), records[1]
    # A traceback keeps its lines, indented: the exception's own line breaks start no record.
    assert lines[-3:] == [f"{TRACEBACK_INDENT}ValueError: bad id", f"{TRACEBACK_INDENT}{FORGED}",
                          f"{TRACEBACK_INDENT}{FORGED}"], text


def test_configure_logging_writes_text_through_the_escaping_formatter():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure_logging("pdserve-test")
        assert [type(h.formatter) for h in root.handlers] == [TextFormatter]
        configure_logging("pdserve-test", json_lines=True)
        assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_json_logs_escape_control_characters_by_themselves():
    log, stream = _json_logger("pdserve.test.json-escape", "pdserve-router")

    async def request_task():
        bind_request(f"ok\n{FORGED}")
        log.warning("request %s", f"a\r\n{FORGED}")

    asyncio.run(request_task())
    (line,) = stream.getvalue().split("\n")[:-1]  # JSON lines: only "\n" ends one
    entry = json.loads(line)
    assert (entry["message"], entry["request_id"]) == (f"request a\r\n{FORGED}", f"ok\n{FORGED}")


def _scrape(registry) -> dict[str, float]:
    """Every sample of a registry's Prometheus text, keyed by name and labels."""
    return parse_metrics(generate_latest(registry).decode())


def test_engine_stats_and_router_metrics_in_prometheus_text():
    registry = new_registry()
    counters = EngineCounters(num_steps=5, num_cache_hit_tokens=32, num_cache_query_tokens=128,
                              num_preemptions=2, num_finished_requests=3)
    stats = EngineStats(num_blocks_total=100, num_blocks_free=60, num_blocks_cached=10, num_running_requests=4,
                        num_running_seqs=5, num_waiting_requests=6, num_waiting_prompt_tokens=70,
                        counters=counters, num_reservations=1, num_blocks_reserved=3)
    registry.register(EngineStatsCollector(lambda: stats))
    router = RouterMetrics(registry)
    router.time_to_first_token.observe(0.03)
    router.request_success.labels("length").inc()
    got = _scrape(registry)
    assert got["pdserve:num_requests_running"] == 4 and got["pdserve:num_requests_waiting"] == 6
    assert got["pdserve:kv_cache_blocks_used"] == 40 and got["pdserve:kv_cache_blocks_free"] == 60
    assert got["pdserve:kv_cache_usage_perc"] == pytest.approx(0.4)
    assert got["pdserve:prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert got["pdserve:prefix_cache_hits_total"] == 32 and got["pdserve:num_preemptions_total"] == 2
    assert got["pdserve:time_to_first_token_seconds_count"] == 1
    assert got["pdserve:time_to_first_token_seconds_bucket{le=0.04}"] == 1
    assert got["pdserve:time_to_first_token_seconds_bucket{le=0.02}"] == 0
    assert got["pdserve:request_success_total{finished_reason=length}"] == 1
    assert "process_cpu_seconds_total" in got


def test_kv_receiver_reports_transfers_with_handshake_metadata():
    caches = [(torch.zeros(8, 4, 2, 8), torch.zeros(8, 4, 2, 8)) for _ in range(2)]
    reports, done = [], []
    receiver = TCPKVReceiver(caches, observer=reports.append)
    endpoint = receiver.start()
    try:
        receiver.expect("r1", [5, 2], 6, lambda rid, err: done.append(err))
        source = [(torch.randn(8, 4, 2, 8), torch.randn(8, 4, 2, 8)) for _ in range(2)]
        transfer = TCPKVSender(KVLayout.from_kv_caches(source)).open(
            endpoint, "r1", 6, metadata={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
        for layer, (k, v) in enumerate(source):
            transfer.send_layer(layer, k, v, [0, 1])
        stats = transfer.finish(timeout=10)
    finally:
        receiver.stop()
    assert done == [None]
    (report,) = reports
    assert report.reservation_id == "r1" and report.error is None
    assert report.metadata["traceparent"].startswith("00-1111")
    assert report.bytes == stats.bytes > 0 and report.blocks == 2 and report.seconds >= 0
    assert torch.equal(caches[1][0][[5, 2]], source[1][0][[0, 1]])


def test_lifecycle_refuses_new_work_and_drains_what_is_in_flight():
    async def scenario():
        lifecycle = Lifecycle()
        reservations = {"a": 1}
        lifecycle.add_source(lambda: len(reservations))
        with lifecycle.track():
            assert lifecycle.in_flight == 2
            lifecycle.accepting = False
            with pytest.raises(DrainingError, match=DRAINING_DETAILS):
                lifecycle.check_accepting("Reserve")
        assert not await lifecycle.drain(0.1)  # the reservation is still open
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, reservations.clear)
        assert await lifecycle.drain(5.0)
        with lifecycle.track():
            forced = asyncio.Event()
            loop.call_later(0.1, forced.set)
            assert not await lifecycle.drain(30.0, forced)  # a second signal cuts the wait

    asyncio.run(scenario())


def test_draining_refusal_is_recognised_over_grpc():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdserve.runtime.status import map_errors

    class Refusing(health_pb2_grpc.HealthServicer):
        @map_errors
        async def Check(self, request, context):
            raise DrainingError("Check")

    async def scenario():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Refusing(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        finally:
            await server.stop(0)
        return info.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and is_draining_refusal(error)
    assert not is_draining_refusal(ValueError(DRAINING_DETAILS))


def test_the_otlp_endpoint_comes_from_the_flag_then_the_standard_variables(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.otlp_endpoint_from(None) is None and tracing.otlp_endpoint_from("  ") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.otlp_endpoint_from(None) == "http://collector:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "traces:4317")
    assert tracing.otlp_endpoint_from(None) == "traces:4317"
    assert tracing.otlp_endpoint_from("flag:4317") == "flag:4317"
