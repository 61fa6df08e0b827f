"""Units of the router's failover: which errors are retried, the backoff, the relay's skipping of
restated text and re-generated tokens, the state a resumed request starts from, and the owner
(caller identity) a request keeps through resumes and Redis rewrites."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from helpers.relay_testing import Relay
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.dispatch import params_record
from pdserve.router.failover import RetryPolicy, SuspectWorkers, is_worker_failure
from pdserve.router.progress import ProgressRecorder
from pdserve.router.responses import SampleProgressState, StreamState, responses_for
from pdserve.router.resume import params_from_record, released_text, resumed_state
from pdserve.runtime.errors import InvalidRequestError, OverloadedError, UnavailableError
from pdserve.state.embedded_redis import EmbeddedRedis
from pdserve.state.request_store import RequestRecord, RequestStore
from pdserve.v1 import worker_pb2


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(make_tiny_model(tmp_path_factory.mktemp("units") / "tiny", arch="llama", seed=0))


@pytest.mark.parametrize("code,retried", [
    (grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.INTERNAL, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, True), (grpc.StatusCode.NOT_FOUND, True),
    (grpc.StatusCode.INVALID_ARGUMENT, False), (grpc.StatusCode.OUT_OF_RANGE, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, False), (grpc.StatusCode.UNAUTHENTICATED, False),
])
def test_worker_failures_are_retried_request_errors_are_not(code, retried):
    assert is_worker_failure(_RpcError(code)) is retried


def test_pdserve_errors_and_backoff():
    assert is_worker_failure(UnavailableError("no workers"))
    assert not is_worker_failure(OverloadedError("full"))
    assert not is_worker_failure(ValueError("bad"))
    policy = RetryPolicy(backoff_s=0.1, backoff_max_s=0.3)
    assert 0.05 <= policy.delay_s(1) <= 0.15
    assert all(0.15 <= policy.delay_s(k) <= 0.45 for k in range(3, 10))  # capped at backoff_max_s
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_suspects_expire():
    suspects = SuspectWorkers(cooldown_s=0.0)
    suspects.mark("a")
    assert not suspects.is_suspect("a")
    suspects = SuspectWorkers(cooldown_s=60.0)
    suspects.mark("a")
    assert suspects.is_suspect("a") and not suspects.is_suspect("b")


def _output(index: int, tokens: list[int], text: str, finish: str = "") -> worker_pb2.RequestOutput:
    return worker_pb2.RequestOutput(samples=[worker_pb2.SampleOutput(index=index, token_ids=tokens, text=text,
                                                                     finish_reason=finish)])


def test_relay_drops_restated_text_and_regenerated_tokens():
    state = StreamState("r", 3, [SampleProgressState(token_ids=[5, 6], text_chars=4)])
    state.samples[0].expect_restated_text()
    state.samples[0].skip_tokens = 1
    # The continuing worker restates "abcd", re-generates token 7 (with "ef"), then goes on.
    assert responses_for(state, _output(0, [], "abcd")) == []
    assert responses_for(state, _output(0, [7], "ef")) == []
    sent = responses_for(state, _output(0, [8], "gh", "length"))
    assert [r.chunk.token_ids for r in sent[:1]] == [[8]] and sent[0].chunk.text == "gh"
    # The re-generated token is the client's already: counted, recorded, not sent again.
    assert sent[1].complete.finish_reason == "length" and sent[1].complete.completion_tokens == 4
    assert state.samples[0].token_ids == [5, 6, 7, 8] and state.samples[0].text_chars == 8


def test_relay_cuts_restated_text_inside_a_chunk():
    state = StreamState("r", 3, [SampleProgressState(token_ids=[5], text_chars=2)])
    state.samples[0].expect_restated_text()
    (chunk,) = responses_for(state, _output(0, [9], "abXY"))
    assert chunk.chunk.text == "XY" and list(chunk.chunk.token_ids) == [9]
    assert state.samples[0].text_chars == 4


def _record(tokens: list[list[int]], finished: list[str | None], params: SamplingParams) -> RequestRecord:
    return RequestRecord("req", [3, 4, 5], params_record(params), params.seed, tokens, finished)


def test_a_record_keeps_every_sampling_field():
    from pdserve.models.sampling_params import StructuredOutput

    params = SamplingParams(max_tokens=10, seed=7, logit_bias={5: -2.5, 9: 100.0}, prompt_logprobs=3,
                            structured=StructuredOutput("json_schema", '{"type": "object"}'))
    assert params_from_record(_record([[1]], [None], params)) == params


def test_resume_from_a_record_that_lags_or_leads_the_client(tokenizer):
    params = SamplingParams(max_tokens=10, temperature=0.0, n=3, seed=7, stop=("zz",))
    record = _record([[10, 11, 12], [20, 21], [30, 31, 32]], [None, None, "stop"], params)
    assert params_from_record(record) == params
    state, replay = resumed_state(record, params, [2, 4, 1], tokenizer)
    lagging, leading, finished = state.samples
    # Client holds 2 of 3 recorded tokens: continue from the 2, re-generate the third.
    assert lagging.token_ids == [10, 11] and lagging.skip_tokens == 0
    assert lagging.text_chars == sum(map(len, released_text(tokenizer, [3, 4, 5], params, [10, 11])))
    # Client holds 4, the record 2: continue from the 2, drop the next 2 re-generated tokens.
    assert leading.token_ids == [20, 21] and leading.skip_tokens == 2
    # A finished sample: the client gets the 2 recorded tokens it lacks, then the completion.
    assert finished.finish_reason == "stop" and finished.token_ids == [30, 31, 32]
    assert list(replay[0].chunk.token_ids) == [31, 32] and replay[1].complete.finish_reason == "stop"


def test_resume_refuses_counts_that_contradict_the_record(tokenizer):
    params = SamplingParams(max_tokens=5, temperature=0.0, n=1, seed=1)
    with pytest.raises(InvalidRequestError, match="finished with 2 tokens"):
        resumed_state(_record([[1, 2]], ["length"], params), params, [3], tokenizer)
    with pytest.raises(InvalidRequestError, match="n=1"):
        resumed_state(_record([[1]], [None], params), params, [1, 1], tokenizer)
    with pytest.raises(InvalidRequestError, match="exceeds max_tokens"):
        resumed_state(_record([[1]], [None], params), params, [6], tokenizer)


def test_a_resumed_request_keeps_its_owner(tokenizer):
    params = SamplingParams(max_tokens=5, temperature=0.0, n=1, seed=1)
    record = RequestRecord("req", [3, 4, 5], params_record(params), 1, [[1]], [None], owner="key:abc")
    state, _ = resumed_state(record, params, [1], tokenizer)
    assert state.owner == "key:abc"


def test_the_owner_survives_redis_losing_the_record():
    """The owner goes into Redis with the record, and a recorder that rewrites a lost record
    (Redis restarted empty) writes it back: otherwise its owner could no longer resume it."""
    async def scenario(url: str):
        client = aioredis.from_url(url)
        store = RequestStore(client, prefix="owner", ttl_s=60)
        try:
            assert await store.create("r", [1, 2], {"n": 1}, 7, owner="key:0123")
            assert (await store.get("r")).owner == "key:0123"
            recorder = ProgressRecorder(store, "r", [1, 2], {"n": 1}, 7, owner="key:0123")
            relay = Relay(recorder, 1)
            relay.chunk(0, [5])
            await client.delete("owner:req:r", "owner:req:r:tokens:0")  # Redis lost it
            relay.chunk(0, [6])
            relay.done(0, "length")
            await recorder.close()
            return await store.get("r"), await store.create("r", [9], {"n": 1}, 7, owner="key:other")
        finally:
            await client.aclose()

    with EmbeddedRedis() as server:
        record, second_create = asyncio.run(scenario(server.url))
    assert record == RequestRecord("r", [1, 2], {"n": 1}, 7, [[5, 6]], ["length"], owner="key:0123")
    assert second_create is False  # another identity cannot take over the id either
