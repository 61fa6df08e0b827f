"""The bad-input table: each malformed or out-of-range call to a public or internal service of a
real cluster (1 prefill + 1 decode + router) gets its documented status code and a message
naming what is wrong, and afterwards the cluster still serves the same tokens with every KV
block free. README "Bad input" lists the same table."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis

from helpers.bad_input_requests import (
    FORGED_LOG_LINE,
    HUGE_LIST,
    LOG_FORGING_IDS,
    TOKENS,
    Env,
    decode_of_other_request,
    decode_prompt_not_the_reserved_one,
    decode_without_first_token,
    duplicate_request_id,
    engine_params,
    generate,
    huge_stop_token_ids,
    huge_token_prompt,
    prefill,
    prefill_duplicate_request_id,
    prefill_incompatible_layout,
    prefill_other_blocks,
    prefill_refused_endpoint,
    prefill_silent_endpoint,
    prefill_too_few_blocks,
    prefill_unknown_reservation,
    reservation_hog,
    sample,
    token_ids,
)
from helpers.bad_input_testing import (
    MAX_MODEL_LEN,
    VOCAB_SIZE,
    assert_all_alive,
    log_tails,
    reference_tokens,
    start_cluster,
    wait_nothing_held,
)
from pdserve.models.tiny_model import make_tiny_model
from pdserve.router.servicer import MAX_PROMPT_CHARS
from pdserve.runtime.channels import MAX_MESSAGE_BYTES
from pdserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

Code = grpc.StatusCode
SP = router_pb2.SamplingParams


# ----- the table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One bad call: service target ("router", "prefill", "decode", "decode-control",
    "prefill-control"), RPC, the request (a message, raw bytes, or an async factory taking
    the Env), the status code and a substring of its details (or, for OK, the expected reply or
    a predicate on it)."""

    name: str
    target: str
    rpc: str
    request: object
    code: grpc.StatusCode
    details: str = ""
    reply: object = None


def _router(name, request, code, details):
    return Case(name, "router", "Generate", request, code, details)


def _sampling(name, sampling, details):
    return _router(name, generate(sampling), Code.INVALID_ARGUMENT, details)


NAN, INF = math.nan, math.inf
CASES = [
    # Router.Generate: the prompt
    _router("empty-text-prompt", generate(prompt=""), Code.INVALID_ARGUMENT, "the prompt is empty"),
    _router("empty-token-prompt", generate(prompt_token_ids=token_ids([])), Code.INVALID_ARGUMENT,
            "the prompt is empty"),
    _router("no-prompt", generate(no_input=True), Code.INVALID_ARGUMENT, "set either prompt or prompt_token_ids"),
    _router("prompt-longer-than-context", generate(SP(max_tokens=10), prompt_token_ids=token_ids([5] * 250)),
            Code.OUT_OF_RANGE, f"prompt (250 tokens) + max_tokens (10) exceeds the model's context of {MAX_MODEL_LEN}"),
    _router("max-tokens-beyond-context", generate(SP(max_tokens=4_000_000_000)), Code.OUT_OF_RANGE,
            "+ max_tokens (4000000000) exceeds the model's context"),
    _router("prompt-token-outside-vocab", generate(prompt_token_ids=token_ids([1, 2, VOCAB_SIZE])),
            Code.INVALID_ARGUMENT, f"prompt_token_ids holds {VOCAB_SIZE}, outside the vocabulary (size {VOCAB_SIZE})"),
    _router("prompt-over-char-limit", generate(prompt="x" * (MAX_PROMPT_CHARS + 1)), Code.OUT_OF_RANGE,
            f"prompt has {MAX_PROMPT_CHARS + 1} characters; the limit is {MAX_PROMPT_CHARS}"),
    _router("message-over-max-size", generate(prompt="x" * (MAX_MESSAGE_BYTES + 1)), Code.RESOURCE_EXHAUSTED,
            "larger than max"),
    _router("duplicate-request-id", duplicate_request_id, Code.ALREADY_EXISTS, "request_id 'dup-id' is already in use"),
    _router("request-id-too-long", generate(request_id="r" * 1000), Code.INVALID_ARGUMENT,
            "request_id has 1000 characters; the limit is 200"),
    *[_router(f"request-id-with-{name}", generate(request_id=request_id), Code.INVALID_ARGUMENT,
              "request_id may hold only letters, digits and") for name, request_id in [
        *LOG_FORGING_IDS.items(), ("space", "a b"), ("nul", "a\x00b"), ("non-ascii", "café"),
        ("redis-key-separator", "x:tokens:0"), ("attempt-separator", "x~0123abcd")]],
    _router("prompt_token_ids-5-million", huge_token_prompt, Code.OUT_OF_RANGE,
            f"prompt ({HUGE_LIST} tokens) + max_tokens (16) exceeds the model's context of {MAX_MODEL_LEN}"),
    _router("resume-received_tokens-beyond-max-n", generate(request_id="any", resume=True, received_tokens=[0] * 17),
            Code.INVALID_ARGUMENT, "received_tokens has 17 entries; a request has at most 16 samples"),
    _router("n-times-max-tokens-exceeds-kv-pool",
            generate(SP(n=16, max_tokens=200), prompt_token_ids=token_ids([5] * 16)),
            Code.OUT_OF_RANGE, "KV blocks but this server has"),
    # Router.Generate: every sampling field out of range
    *[_sampling(f"temperature-{v}", SP(temperature=v), f"temperature must be in [0, 100], got {float(v)}")
      for v in (-1, NAN, INF, 101)],
    *[_sampling(f"top_p-{v}", SP(top_p=v), f"top_p must be in (0, 1], got {float(v)}") for v in (0, 1.5, NAN)],
    _sampling("top_k--2", SP(top_k=-2), "top_k must be -1, 0 (off) or a positive count, got -2"),
    *[_sampling(f"min_p-{v}", SP(min_p=v), f"min_p must be in [0, 1], got {float(v)}") for v in (-0.1, 1.5, NAN)],
    *[_sampling(f"repetition_penalty-{v}", SP(repetition_penalty=v),
                f"repetition_penalty must be in (0, 10], got {float(v)}") for v in (0, -1, 11, NAN)],
    *[_sampling(f"presence_penalty-{v}", SP(presence_penalty=v), f"presence_penalty must be in [-2, 2], got {float(v)}")
      for v in (2.5, -2.5, NAN)],
    *[_sampling(f"frequency_penalty-{v}", SP(frequency_penalty=v),
                f"frequency_penalty must be in [-2, 2], got {float(v)}") for v in (3, -3, INF)],
    *[_sampling(f"n-{v}", SP(n=v), f"n must be in [1, 16], got {v}") for v in (0, 17)],
    _sampling("logprobs-21", SP(logprobs=21), "logprobs must be in [0, 20], got 21"),
    _sampling("min_tokens-over-max_tokens", SP(max_tokens=4, min_tokens=5),
              "min_tokens must be in [0, max_tokens], got 5 with max_tokens 4"),
    _sampling("max_tokens-0", SP(max_tokens=0), "max_tokens must be >= 1, got 0"),
    _sampling("stop-empty-string", SP(stop=[""]),
              "stop strings must be non-empty and at most 256 characters, got one of 0 characters"),
    _sampling("stop-17-strings", SP(stop=["a"] * 17), "at most 16 stop strings, got 17"),
    _sampling("stop-257-characters", SP(stop=["a" * 257]),
              "stop strings must be non-empty and at most 256 characters, got one of 257 characters"),
    _sampling("stop_token_ids-outside-vocab", SP(stop_token_ids=[VOCAB_SIZE]),
              f"sampling.stop_token_ids holds {VOCAB_SIZE}, outside the vocabulary"),
    _sampling("stop_token_ids-1025", SP(stop_token_ids=[7] * 1025), "stop_token_ids has 1025 ids; the limit is 1024"),
    _router("stop_token_ids-5-million", huge_stop_token_ids, Code.INVALID_ARGUMENT,
            f"stop_token_ids has {HUGE_LIST} ids; the limit is 1024"),
    # Router: other RPCs, and bytes that are no protobuf message
    Case("abort-unknown-id", "router", "Abort", router_pb2.AbortRequest(request_id="never-ran"), Code.OK,
         reply=router_pb2.AbortResponse(found=False)),
    Case("abort-request-id-with-newline", "router", "Abort",
         router_pb2.AbortRequest(request_id=LOG_FORGING_IDS["newline"]), Code.INVALID_ARGUMENT,
         "request_id may hold only letters, digits and"),
    Case("tokenize-huge-text", "router", "Tokenize", router_pb2.TokenizeRequest(text="hello " * 200_000),
         Code.OUT_OF_RANGE, f"text has 1200000 characters; the limit is {MAX_PROMPT_CHARS}"),
    Case("generate-undecodable-bytes", "router", "Generate", b"\x0a\x05ab", Code.INVALID_ARGUMENT,
         "the request is not a valid protobuf message"),
    # DecodeWorker.Reserve
    *[Case(f"reserve-{name}", "decode", "Reserve",
           decode_pb2.ReserveRequest(**{**dict(request_id="r", prompt_tokens=10, max_tokens=4, n=1), **fields_}),
           code, details) for name, fields_, code, details in [
        ("prompt_tokens-0", dict(prompt_tokens=0), Code.INVALID_ARGUMENT, "prompt_tokens must be >= 1"),
        ("max_tokens-0", dict(max_tokens=0), Code.INVALID_ARGUMENT, "max_tokens must be >= 1"),
        ("n-0", dict(n=0), Code.INVALID_ARGUMENT, "n must be in [1, 16], got 0"),
        ("n-17", dict(n=17), Code.INVALID_ARGUMENT, "n must be in [1, 16], got 17"),
        ("no-request-id", dict(request_id=""), Code.INVALID_ARGUMENT, "request_id is required"),
        ("lease-too-long", dict(lease_ms=4_000_000_000), Code.INVALID_ARGUMENT, "lease_ms must be at most 600000"),
        ("longer-than-context", dict(prompt_tokens=200, max_tokens=100), Code.OUT_OF_RANGE,
         f"prompt (200 tokens) + max_tokens (100) exceeds the model's context of {MAX_MODEL_LEN}"),
        ("more-blocks-than-the-pool", dict(prompt_tokens=16, max_tokens=200, n=16), Code.OUT_OF_RANGE,
         "may need 209 KV blocks but this server has"),
    ]],
    Case("reserve-more-blocks-than-free", "decode", "Reserve", reservation_hog, Code.RESOURCE_EXHAUSTED,
         "tokens need 15 KV blocks"),
    Case("reserve-lease-0-is-the-default", "decode", "Reserve",
         decode_pb2.ReserveRequest(request_id="r", prompt_tokens=10, max_tokens=4, n=1, lease_ms=0), Code.OK,
         reply=lambda granted: granted.lease_ms == 30_000 and len(granted.block_ids) == 1),
    # DecodeWorker.Decode
    *[Case(f"decode-{name}", "decode", "Decode", request, code, details) for name, request, code, details in [
        ("unknown-reservation", decode_pb2.DecodeRequest(
            request_id="d", reservation_id="never-made", prompt_token_ids=TOKENS, samples=[sample()],
            sampling=engine_params()),
         Code.NOT_FOUND, "reservation 'never-made' is not open"),
        ("reservation-of-another-request", decode_of_other_request, Code.INVALID_ARGUMENT,
         "belongs to request 'owner'"),
        ("prompt-not-the-reserved-one", decode_prompt_not_the_reserved_one, Code.INVALID_ARGUMENT,
         "holds KV for 10 prompt tokens, the request's prompt has 5"),
        ("sample-without-first-token", decode_without_first_token, Code.INVALID_ARGUMENT, "needs its first token"),
        ("sample-index-beyond-n", decode_pb2.DecodeRequest(request_id="d", prompt_token_ids=TOKENS,
                                                           samples=[sample(index=5)], sampling=engine_params()),
         Code.INVALID_ARGUMENT, "sample index 5 is not in [0, n=1)"),
        ("no-samples", decode_pb2.DecodeRequest(request_id="d", prompt_token_ids=TOKENS, sampling=engine_params()),
         Code.INVALID_ARGUMENT, "at least one sample must continue"),
        ("generated-token-outside-vocab", decode_pb2.DecodeRequest(
            request_id="d", prompt_token_ids=TOKENS, samples=[sample(tokens=[VOCAB_SIZE])], sampling=engine_params()),
         Code.INVALID_ARGUMENT, f"is not a token id in [0, {VOCAB_SIZE})"),
        ("default-sampling-message", decode_pb2.DecodeRequest(
            request_id="d", prompt_token_ids=TOKENS, samples=[sample()], sampling=worker_pb2.EngineSamplingParams()),
         Code.INVALID_ARGUMENT, "max_tokens must be >= 1"),
        ("undecodable-bytes", b"\xff\xff\xff", Code.INVALID_ARGUMENT, "the request is not a valid protobuf message"),
    ]],
    # PrefillWorker.Prefill
    *[Case(f"prefill-{name}", "prefill", "Prefill", request, code, details) for name, request, code, details in [
        ("empty-prompt", prefill(prefill_pb2.KvTarget(kv_endpoint="127.0.0.1:1", reservation_id="r"), prompt=[]),
         Code.INVALID_ARGUMENT, "the prompt is empty"),
        ("no-kv-target", prefill(None), Code.INVALID_ARGUMENT, "kv_target.reservation_id is required"),
        ("bad-sampling", prefill(None, sampling=engine_params(top_p=0.0)), Code.INVALID_ARGUMENT,
         "top_p must be in (0, 1], got 0.0"),
        ("kv-target-too-few-blocks", prefill_too_few_blocks, Code.INVALID_ARGUMENT,
         "kv_target has 1 block ids; a prompt of 40 tokens needs 3 blocks"),
        ("kv-target-other-blocks", prefill_other_blocks, Code.INVALID_ARGUMENT,
         "kv_target does not match the reservation"),
        ("unknown-reservation", prefill_unknown_reservation, Code.NOT_FOUND, "no reservation 'never-made'"),
        ("malformed-endpoint", prefill(prefill_pb2.KvTarget(kv_endpoint="no-port", reservation_id="r", block_ids=[1])),
         Code.INVALID_ARGUMENT, "KV endpoint 'no-port' is not 'host:port'"),
        ("refused-endpoint", prefill_refused_endpoint, Code.UNAVAILABLE, "cannot be reached"),
        ("silent-endpoint", prefill_silent_endpoint, Code.UNAVAILABLE, "did not answer the KV handshake in time"),
        ("incompatible-kv-layout", prefill_incompatible_layout, Code.FAILED_PRECONDITION,
         "KV cache layouts are incompatible"),
        ("duplicate-request-id", prefill_duplicate_request_id, Code.ALREADY_EXISTS,
         "request 'dup-p' is already running on this worker"),
    ]],
    # WorkerControl.Abort
    *[Case(f"{role}-abort-unknown-id", f"{role}-control", "Abort",
           worker_pb2.WorkerAbortRequest(request_id="never-ran"), Code.OK,
           reply=worker_pb2.WorkerAbortResponse(found=False)) for role in ("prefill", "decode")],
]

STUBS = {"router": router_pb2_grpc.RouterStub, "prefill": prefill_pb2_grpc.PrefillWorkerStub,
         "decode": decode_pb2_grpc.DecodeWorkerStub, "prefill-control": worker_pb2_grpc.WorkerControlStub,
         "decode-control": worker_pb2_grpc.WorkerControlStub}
SERVICES = {"router": "pdserve.v1.Router", "prefill": "pdserve.v1.PrefillWorker", "decode": "pdserve.v1.DecodeWorker"}
STREAMING = {"Generate", "Decode"}
CALL_DEADLINE_S = 20.0  # every case must end well before: none may hang


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(the running cluster, a greedy request's tokens before any bad input)."""
    model = make_tiny_model(tmp_path_factory.mktemp("badinput") / "tiny", arch="llama", seed=0)
    running = start_cluster(str(model))
    try:
        yield running, reference_tokens(running.router_address, running.client_security())
    finally:
        running.stop()


def _env(cluster) -> Env:
    decode = cluster.servers("decode")[0]
    return Env(cluster.router_address, cluster.servers("prefill")[0].address, decode.address, decode.kv_endpoint,
               cluster.security)


async def _call(env: Env, case: Case):
    """Send the case's request; returns (code, details, reply)."""
    addresses = {"router": env.router, "prefill": env.prefill, "prefill-control": env.prefill}
    address = addresses.get(case.target, env.decode)
    request = await case.request(env) if callable(case.request) else case.request
    channel = env.channel(address)
    if isinstance(request, bytes):  # raw bytes through a generic method: no client-side parsing
        method = f"/{SERVICES[case.target]}/{case.rpc}"
        make = channel.unary_stream if case.rpc in STREAMING else channel.unary_unary
        call = make(method)(request, timeout=CALL_DEADLINE_S)
    else:
        call = getattr(STUBS[case.target](channel), case.rpc)(request, timeout=CALL_DEADLINE_S)
    try:
        reply = [r async for r in call] if case.rpc in STREAMING else await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", None
    return Code.OK, "", reply


async def _run(env: Env, case: Case):
    try:
        return await _call(env, case)
    finally:
        if case.target == "decode" and isinstance(case.request, decode_pb2.ReserveRequest):
            await env.abort_on_decode(case.request.request_id)  # had it been granted: no lease left behind
        for cleanup in env.cleanups:
            await cleanup()
        for task in env.background:
            task.cancel()
        await asyncio.gather(*env.background, return_exceptions=True)
        for close in env.closers:
            close()
        for channel in env.channels:
            await channel.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_status(cluster, case):
    started = time.monotonic()
    code, details, reply = asyncio.run(_run(_env(cluster[0]), case))
    assert (code, case.details in details) == (case.code, True), f"{case.name}: got {code.name}: {details!r}"
    if case.reply is not None:
        assert case.reply(reply) if callable(case.reply) else reply == case.reply, reply
    assert time.monotonic() - started < CALL_DEADLINE_S / 2, "bad input must be answered promptly"


def test_after_the_table_the_cluster_serves_the_same_tokens_and_holds_no_block(cluster):
    cluster, reference = cluster
    loads = wait_nothing_held(cluster, timeout_s=15)  # well within the 30 s lease: no block waits for it
    assert_all_alive(cluster)
    assert reference_tokens(cluster.router_address, cluster.client_security()) == reference, log_tails(cluster)
    assert all(load.num_blocks_total > 0 for load in loads.values())


# ----- refusals that must leave no trace -----------------------------------------------------

async def _generate_status(env: Env, request: router_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    """The status a Generate ends with (OK once its stream is read to the end)."""
    call = router_pb2_grpc.RouterStub(env.channel(env.router)).Generate(request, timeout=CALL_DEADLINE_S)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


def test_oversized_lists_are_refused_before_anything_reaches_redis(cluster):
    cluster = cluster[0]
    recorded = f"recorded-{uuid.uuid4().hex}"
    refused = {f"huge-stops-{uuid.uuid4().hex}": generate(SP(stop_token_ids=[7] * HUGE_LIST)),
               f"huge-prompt-{uuid.uuid4().hex}": generate(prompt_token_ids=token_ids([7] * HUGE_LIST))}

    async def scenario():
        env = _env(cluster)
        try:
            statuses = {}
            for request_id, request in refused.items():
                request.request_id = request_id
                statuses[request_id] = await _generate_status(env, request)
            ok = await _generate_status(env, generate(SP(max_tokens=2), request_id=recorded))
        finally:
            for channel in env.channels:
                await channel.close()
        client = aioredis.from_url(cluster.redis_url)
        try:
            stored = {rid: await client.exists(f"{cluster.prefix}:req:{rid}") for rid in [recorded, *refused]}
        finally:
            await client.aclose()
        return statuses, ok, stored

    statuses, ok, stored = asyncio.run(scenario())
    assert [code for code, _ in statuses.values()] == [Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE], statuses
    assert ok == (Code.OK, "")
    assert stored == {recorded: 1, **{rid: 0 for rid in refused}}  # the control shows where a record would be


def test_request_ids_that_would_forge_log_lines_are_refused_and_never_logged(cluster):
    cluster = cluster[0]
    after = f"after-forgery-{uuid.uuid4().hex}"

    async def scenario():
        env = _env(cluster)
        try:
            codes = [(await _generate_status(env, generate(SP(max_tokens=2), request_id=rid)))[0]
                     for rid in LOG_FORGING_IDS.values()]
            stub = router_pb2_grpc.RouterStub(env.channel(env.router))
            for rid in LOG_FORGING_IDS.values():
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.Abort(router_pb2.AbortRequest(request_id=rid), timeout=CALL_DEADLINE_S)
                codes.append(error.value.code())
            ok = await _generate_status(env, generate(SP(max_tokens=2), request_id=after))
        finally:
            for channel in env.channels:
                await channel.close()
        return codes, ok

    codes, ok = asyncio.run(scenario())
    assert set(codes) == {Code.INVALID_ARGUMENT} and ok == (Code.OK, "")
    log_path = next(p.log_path for p in cluster.processes if p.role == "router")
    deadline = time.monotonic() + 10
    while f"request {after} finished" not in (log := log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"the router never logged {after}: {log[-3000:]}"
        time.sleep(0.1)
    lines = log.splitlines()  # also splits at \r, \x85 and \u2028, as some log viewers do
    assert not any(line.startswith(FORGED_LOG_LINE) for line in lines), log[-3000:]
