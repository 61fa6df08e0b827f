"""pdserve.runtime against a real grpc.aio server on a loopback port: health, reflection,
the exception -> status mapping, and the sampling-params conversions."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.models.sampling_params import SamplingParams, SamplingParamsError
from pdserve.runtime.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PromptTooLongError,
    UnavailableError,
)
from pdserve.runtime.health import add_health_and_reflection, service_names_of
from pdserve.runtime.sampling_proto import (
    engine_sampling_params_to_proto,
    sampling_params_from_engine_proto,
    sampling_params_from_proto,
    with_resolved_seed,
)
from pdserve.runtime.status import map_errors
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2

Code = grpc.StatusCode
ERRORS = {  # Abort(request_id=key) raises the value; the client must see the code
    "too-long": (PromptTooLongError("prompt has 5000 tokens, limit 4096"), Code.OUT_OF_RANGE),
    "invalid": (InvalidRequestError("prompt must not be empty"), Code.INVALID_ARGUMENT),
    "sampling": (SamplingParamsError("top_p must be in (0, 1]"), Code.INVALID_ARGUMENT),
    "value": (ValueError("token id 999 >= vocab_size 384"), Code.INVALID_ARGUMENT),
    "overloaded": (OverloadedError("queue full"), Code.RESOURCE_EXHAUSTED),
    "not-found": (NotFoundError("unknown request 'x'"), Code.NOT_FOUND),
    "exists": (AlreadyExistsError("request 'x' is running"), Code.ALREADY_EXISTS),
    "unavailable": (UnavailableError("no decode server"), Code.UNAVAILABLE),
    "timeout": (TimeoutError("KV never arrived"), Code.DEADLINE_EXCEEDED),
    "bug": (KeyError("oops"), Code.INTERNAL),
}


class TinyRouter(router_pb2_grpc.RouterServicer):
    """A trivial Router: Generate streams max_tokens one-token chunks (then raises if the
    prompt is "fail"), Abort raises ERRORS[request_id], Tokenize makes a downstream call."""

    def __init__(self) -> None:
        self.generate_cleaned_up = asyncio.Event()
        self.downstream: router_pb2_grpc.RouterStub | None = None

    @map_errors
    async def Generate(self, request, context):
        try:
            params = sampling_params_from_proto(request.sampling)
            for position in range(params.max_tokens):
                yield router_pb2.GenerateResponse(
                    request_id=request.request_id,
                    chunk=router_pb2.TokenChunk(token_ids=[position], text=f"t{position}"))
            if request.prompt == "fail":
                raise OverloadedError("decode pool full")
            done = router_pb2.Completion(finish_reason="length",
                                         completion_tokens=params.max_tokens)
            yield router_pb2.GenerateResponse(request_id=request.request_id, complete=done)
        finally:
            self.generate_cleaned_up.set()

    @map_errors
    async def Abort(self, request, context):
        raise ERRORS[request.request_id][0]

    @map_errors
    async def Tokenize(self, request, context):
        await self.downstream.Abort(router_pb2.AbortRequest(request_id=request.text))
        return router_pb2.TokenizeResponse()

    @map_errors
    async def GetModelInfo(self, request, context):
        return router_pb2.ModelInfo(model_name="tiny", vocab_size=384)


@contextlib.asynccontextmanager
async def serving(servicer: TinyRouter):
    """A real grpc.aio server on 127.0.0.1:<free port>; yields (channel, health servicer)."""
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    health = await add_health_and_reflection(server, service_names_of(router_pb2))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            servicer.downstream = router_pb2_grpc.RouterStub(channel)
            yield channel, health
    finally:
        await server.stop(None)


def run(coroutine_function):
    """Run an async test body with a fresh servicer and server."""
    async def body():
        servicer = TinyRouter()
        async with serving(servicer) as (channel, health):
            return await coroutine_function(servicer, channel, health)
    return asyncio.run(body())


def test_health_reports_serving_then_not_serving_after_shutdown():
    async def body(servicer, channel, health):
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pdserve.v1.Router"):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Nope"))
        assert unknown.value.code() == Code.NOT_FOUND
        await health.enter_graceful_shutdown()
        response = await stub.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Router"))
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    run(body)


def test_reflection_lists_services_and_serves_the_router_proto():
    async def body(servicer, channel, health):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdserve.v1.Router"),
        ]
        responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
        listed = {s.name for s in responses[0].list_services_response.service}
        assert listed == {"pdserve.v1.Router", "grpc.health.v1.Health",
                          "grpc.reflection.v1alpha.ServerReflection"}
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in responses[1].file_descriptor_response.file_descriptor_proto]
        router_file = next(f for f in files if f.name == "pdserve/v1/router.proto")
        assert [m.name for m in router_file.service[0].method] == [
            "Generate", "Abort", "Tokenize", "GetModelInfo"]
    run(body)


def test_service_names_of_modules():
    assert service_names_of(router_pb2) == ["pdserve.v1.Router"]
    assert service_names_of(worker_pb2) == ["pdserve.v1.WorkerControl"]


@pytest.mark.parametrize("key", sorted(ERRORS))
def test_exceptions_become_their_status_codes(key):
    error, code = ERRORS[key]

    async def body(servicer, channel, health):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await router_pb2_grpc.RouterStub(channel).Abort(router_pb2.AbortRequest(request_id=key))
        assert raised.value.code() == code
        assert str(error) in raised.value.details()
    run(body)


def test_a_downstream_status_passes_through_unchanged():
    async def body(servicer, channel, health):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            stub = router_pb2_grpc.RouterStub(channel)
            await stub.Tokenize(router_pb2.TokenizeRequest(text="overloaded"))
        assert raised.value.code() == Code.RESOURCE_EXHAUSTED
        assert raised.value.details() == "queue full"
    run(body)


def test_streams_deliver_chunks_then_the_mapped_error():
    async def body(servicer, channel, health):
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(
            request_id="r1", prompt="fail", sampling=router_pb2.SamplingParams(max_tokens=3))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for response in stub.Generate(request):
                received.append(response.chunk.text)
        assert received == ["t0", "t1", "t2"]
        assert raised.value.code() == Code.RESOURCE_EXHAUSTED
        bad = router_pb2.GenerateRequest(prompt="x", sampling=router_pb2.SamplingParams(n=0))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            async for _ in stub.Generate(bad):
                pass
        assert invalid.value.code() == Code.INVALID_ARGUMENT
        assert "n must be in [1, 16]" in invalid.value.details()
        model = await stub.GetModelInfo(router_pb2.GetModelInfoRequest())  # server still serves
        assert model.model_name == "tiny"
    run(body)


def test_cancelling_a_stream_runs_the_servicer_cleanup():
    async def body(servicer, channel, health):
        call = router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
            prompt="long", sampling=router_pb2.SamplingParams(max_tokens=1_000_000)))
        first = await call.read()
        assert first.chunk.token_ids == [0]
        call.cancel()
        await asyncio.wait_for(servicer.generate_cleaned_up.wait(), timeout=10)
    run(body)


def test_map_errors_refuses_plain_functions():
    with pytest.raises(TypeError, match="async def"):
        map_errors(lambda request, context: None)


def test_unset_public_fields_take_the_defaults():
    assert sampling_params_from_proto(router_pb2.SamplingParams()) == SamplingParams()
    assert sampling_params_from_proto(None) == SamplingParams()
    params = sampling_params_from_proto(router_pb2.SamplingParams(logprobs=0, top_k=-1))
    assert (params.logprobs, params.top_k, params.seed, params.n) == (0, -1, None, 1)


def test_set_public_fields_are_taken_with_their_decimal_values():
    message = router_pb2.SamplingParams(
        max_tokens=40, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=-0.5, frequency_penalty=0.25, seed=2**64 - 1, stop=["\n\n", "END"],
        stop_token_ids=[7, 9], ignore_eos=True, n=3, logprobs=5, min_tokens=4)
    assert sampling_params_from_proto(message) == SamplingParams(
        max_tokens=40, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=-0.5, frequency_penalty=0.25, seed=2**64 - 1, stop=("\n\n", "END"),
        stop_token_ids=(7, 9), ignore_eos=True, n=3, logprobs=5, min_tokens=4)


@pytest.mark.parametrize("fields,message", [
    (dict(n=0), "n must be"), (dict(max_tokens=0), "max_tokens must be"),
    (dict(top_p=0.0), "top_p must be"), (dict(min_tokens=17), "min_tokens must be"),
    (dict(temperature=float("nan")), "temperature must be"), (dict(stop=[""]), "stop strings"),
])
def test_explicit_out_of_range_public_fields_are_refused(fields, message):
    with pytest.raises(SamplingParamsError, match=message):
        sampling_params_from_proto(router_pb2.SamplingParams(**fields))


def test_engine_params_round_trip_with_a_resolved_seed():
    params = SamplingParams(max_tokens=9, temperature=0.3, top_k=5, stop=("x",), logprobs=2, n=2)
    resolved = with_resolved_seed(params)
    assert resolved.seed is not None and 0 <= resolved.seed < 2**63
    assert with_resolved_seed(resolved) is resolved
    message = engine_sampling_params_to_proto(resolved)
    assert (message.return_logprobs, message.top_logprobs, message.seed) == (True, 2, resolved.seed)
    wire = worker_pb2.EngineSamplingParams.FromString(message.SerializeToString())
    assert sampling_params_from_engine_proto(wire) == resolved
    no_logprobs = engine_sampling_params_to_proto(SamplingParams(seed=0, logprobs=None))
    assert sampling_params_from_engine_proto(no_logprobs).logprobs is None


def test_engine_params_need_a_seed_and_consistent_fields():
    with pytest.raises(InvalidRequestError, match="resolved seed"):
        engine_sampling_params_to_proto(SamplingParams())
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        sampling_params_from_engine_proto(worker_pb2.EngineSamplingParams())
    message = engine_sampling_params_to_proto(SamplingParams(seed=1))
    message.top_logprobs = 3
    with pytest.raises(InvalidRequestError, match="return_logprobs"):
        sampling_params_from_engine_proto(message)
