"""Overload units: the router's admission control, a worker's queue bound, the retry hint in
gRPC trailing metadata (sent by map_errors, relayed from a downstream server) and the OpenAI
front end's 429 + Retry-After. The cluster tests are in test_overload.py."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from pdserve.openai.protocol import from_rpc_error
from pdserve.router.admission import AdmissionControl, AdmissionLimits
from pdserve.runtime.errors import OverloadedError
from pdserve.runtime.retry_hint import (
    DEFAULT_RETRY_AFTER_MS,
    RETRY_AFTER_MS_KEY,
    STATUS_DETAILS_KEY,
    overload_trailing_metadata,
    retry_after_ms_from_metadata,
    retry_after_ms_of,
)
from pdserve.runtime.status import map_errors
from pdserve.v1 import router_pb2, router_pb2_grpc
from pdserve.workers.queue_bound import QueueBound


def test_admission_refuses_beyond_the_limit_at_once_and_frees_slots_however_calls_end():
    admission = AdmissionControl(AdmissionLimits(max_inflight_requests=2, retry_after_ms=300))
    with admission.admit(), admission.admit():
        assert admission.in_flight == 2
        with pytest.raises(OverloadedError, match="--max-inflight-requests") as refused:
            with admission.admit():
                pass
        assert refused.value.retry_after_ms == 300
        assert admission.in_flight == 2 and admission.num_rejected == 1
    with pytest.raises(KeyError):
        with admission.admit():
            raise KeyError("the call failed")
    assert admission.in_flight == 0
    with admission.admit(), admission.admit():  # both slots free again
        assert admission.in_flight == 2
    assert (admission.num_admitted, admission.num_rejected) == (5, 1)


@pytest.mark.parametrize("kwargs", [{"max_inflight_requests": 0}, {"max_inflight_requests": -3},
                                    {"max_inflight_requests": 2.5}, {"retry_after_ms": -1}])
def test_admission_limits_out_of_range_are_refused_with_the_field_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AdmissionLimits(**kwargs)


def test_queue_bound_counts_held_calls_plus_others_and_hints_engine_errors():
    bound = QueueBound(3, "decode queue", retry_after_ms=200)
    with bound.hold(others=1), bound.hold(others=1):
        with pytest.raises(OverloadedError, match=r"decode queue is full \(3 requests") as refused:
            with bound.hold(others=1):
                pass
        assert refused.value.retry_after_ms == 200
    assert bound.held == 0
    bound.check(2)
    engine_error = OverloadedError("reservation r: 10 tokens need 1 KV blocks, 0 are free")
    bound.add_hint(engine_error)
    assert engine_error.retry_after_ms == 200
    with pytest.raises(ValueError, match="--max-queued-requests"):
        QueueBound(0)


def test_retry_hint_round_trips_through_metadata_and_retry_info():
    trailing = overload_trailing_metadata(1250, "full")
    assert dict(trailing)[RETRY_AFTER_MS_KEY] == "1250"
    assert retry_after_ms_from_metadata(trailing) == 1250
    only_status = [(k, v) for k, v in trailing if k == STATUS_DETAILS_KEY]  # RetryInfo alone
    assert retry_after_ms_from_metadata(only_status) == 1250
    assert retry_after_ms_from_metadata([(STATUS_DETAILS_KEY, b"\xff\x00garbage")]) is None
    assert retry_after_ms_from_metadata([(RETRY_AFTER_MS_KEY, "soon")]) is None
    assert retry_after_ms_from_metadata(None) is None


class _Overloaded(router_pb2_grpc.RouterServicer):
    """Tokenize: OverloadedError with a hint (text "hint") or without; Abort relays a downstream
    call's error; GetModelInfo raises its own OverloadedError (no hint) from the downstream one."""

    def __init__(self) -> None:
        self.downstream: router_pb2_grpc.RouterStub | None = None

    @map_errors
    async def Tokenize(self, request, context):
        raise OverloadedError("queue full", retry_after_ms=250 if request.text == "hint" else None)

    @map_errors
    async def Abort(self, request, context):
        await self.downstream.Tokenize(router_pb2.TokenizeRequest(text="hint"))

    @map_errors
    async def GetModelInfo(self, request, context):
        try:
            await self.downstream.Tokenize(router_pb2.TokenizeRequest(text="hint"))
        except grpc.aio.AioRpcError as error:
            raise OverloadedError("queue full") from error


def test_map_errors_sends_the_retry_hint_and_relays_a_downstream_one():
    async def run():
        server = grpc.aio.server()
        servicer = _Overloaded()
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                servicer.downstream = stub
                errors = []
                for call in (stub.Tokenize(router_pb2.TokenizeRequest(text="hint")),
                             stub.Tokenize(router_pb2.TokenizeRequest(text="")),
                             stub.Abort(router_pb2.AbortRequest(request_id="x")),
                             stub.GetModelInfo(router_pb2.GetModelInfoRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await call
                    errors.append(failed.value)
                return errors
        finally:
            await server.stop(0)

    own, default, relayed, caused = asyncio.run(run())
    for error, hint in ((own, 250), (default, DEFAULT_RETRY_AFTER_MS), (relayed, 250), (caused, 250)):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details() == "queue full"
        assert retry_after_ms_of(error) == hint
        details_only = [m for m in error.trailing_metadata() if m[0] == STATUS_DETAILS_KEY]
        assert retry_after_ms_from_metadata(details_only) == hint


def test_openai_maps_resource_exhausted_to_429_with_retry_after_rounded_up():
    for hint_ms, header in ((1500, "2"), (1000, "1"), (1, "1"), (0, "0")):
        error = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                     grpc.aio.Metadata(*overload_trailing_metadata(hint_ms, "full")), "full")
        mapped = from_rpc_error(error)
        assert (mapped.status, mapped.headers, mapped.body()["error"]["code"]) == (
            429, {"Retry-After": header}, "rate_limit_exceeded")
    no_hint = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "x")
    assert from_rpc_error(no_hint).headers == {"Retry-After": str(math.ceil(DEFAULT_RETRY_AFTER_MS / 1000))}
    other = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "x")
    assert from_rpc_error(other).headers == {}
