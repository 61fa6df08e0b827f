"""Edge cases of the router's failover and resume (issue 8), each found by a review and failing
before its fix: resumes where Redis lags or leads the client, n > 1 resumes, aborts at every
phase, a worker failing after the last completion, a live but failing worker, no prefill server.

Unit part: the relay (responses.py) and resume (resume.py) driven by a simulated continuing
worker that behaves exactly as the engine does (prime_samples restates the generated tokens'
text in its first output, then one token per output). Cluster part: real processes.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.attempt import _progress_of
from pdserve.router.dispatch import params_record
from pdserve.router.responses import responses_for
from pdserve.router.resume import released_text, resumed_state
from pdserve.runtime.api_keys import key_identity
from pdserve.runtime.sampling_proto import sampling_params_from_proto, with_resolved_seed
from pdserve.state.request_store import RequestRecord, RequestStore
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2

PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("review") / "tiny", arch="llama", seed=0))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


class SimulatedWorker:
    """Continues sample 0 of the fault-free sequence `truth` from the tokens it is given, as the
    engine does: first output = the given tokens' released text + the next token with its text."""

    def __init__(self, truth: list[int], deltas: list[str]):
        self.truth, self.deltas = truth, deltas

    def outputs(self, generated: list[int]):
        assert generated == self.truth[:len(generated)], "the worker was handed a wrong context"
        g = len(generated)
        restated = "".join(self.deltas[:g])
        for k in range(g, len(self.truth)):
            finish = "length" if k == len(self.truth) - 1 else ""
            text = (restated if k == g else "") + self.deltas[k]
            yield worker_pb2.RequestOutput(samples=[worker_pb2.SampleOutput(
                index=0, token_ids=[self.truth[k]], text=text, finish_reason=finish)])


def _client_apply(responses, tokens: list[int], text: list[str], completions: list):
    for r in responses:
        if r.HasField("chunk"):
            tokens.extend(r.chunk.token_ids)
            text.append(r.chunk.text)
        else:
            completions.append(r.complete)


def test_worker_failure_after_resume_with_a_lagging_record_repeats_no_token(tokenizer):
    """Router A dies; Redis holds 2 tokens, the client 5. Router B resumes (skip 3), the new
    worker re-generates 2 of the skipped tokens and dies; B fails over. The client must end with
    exactly the fault-free tokens and text."""
    params = SamplingParams(max_tokens=12, temperature=0.0, seed=1, ignore_eos=True)
    truth = list(range(100, 112))
    deltas = released_text(tokenizer, PROMPT, params, truth)
    worker = SimulatedWorker(truth, deltas)
    record = RequestRecord("r", PROMPT, params_record(params), 1, [truth[:2]], [None])
    state, replay = resumed_state(record, params, [5], tokenizer)
    assert replay == []
    tokens, text, completions = list(truth[:5]), list(deltas[:5]), []  # what the client holds
    # Attempt 1 on router B: the worker gets 2 outputs out, then dies.
    first = worker.outputs([s.generated_token_ids for s in _progress_of(state)][0])
    for _ in range(2):
        _client_apply(responses_for(state, next(first)), tokens, text, completions)
    # Failover: attempt 2 continues from what the state says the client holds.
    context = list(_progress_of(state)[0].generated_token_ids)
    for output in worker.outputs(context):
        _client_apply(responses_for(state, output), tokens, text, completions)
    assert tokens == truth
    assert "".join(text) == "".join(deltas)
    assert completions[-1].completion_tokens == len(truth)


def test_completion_tokens_after_resume_count_every_token_the_client_holds(tokenizer):
    """Resume with the client 3 tokens ahead of Redis: the completion's completion_tokens and
    the state (what any later failover or Redis record is built from) must hold all tokens."""
    params = SamplingParams(max_tokens=8, temperature=0.0, seed=1, ignore_eos=True)
    truth = list(range(200, 208))
    deltas = released_text(tokenizer, PROMPT, params, truth)
    record = RequestRecord("r", PROMPT, params_record(params), 1, [truth[:2]], [None])
    state, _ = resumed_state(record, params, [5], tokenizer)
    tokens, text, completions = list(truth[:5]), list(deltas[:5]), []
    for output in SimulatedWorker(truth, deltas).outputs(list(_progress_of(state)[0].generated_token_ids)):
        _client_apply(responses_for(state, output), tokens, text, completions)
    assert tokens == truth
    assert state.samples[0].token_ids == truth, state.samples[0].token_ids
    assert completions[0].completion_tokens == len(truth), completions[0]


def test_resume_with_logprobs_regenerates_finished_tokens_instead_of_replaying_them(tokenizer):
    """logprobs=2: Redis holds no logprobs, so a finished sample whose last tokens the client
    lacks is generated again (with logprobs) instead of replayed from the record."""
    params = SamplingParams(max_tokens=4, temperature=0.0, seed=1, ignore_eos=True, logprobs=2)
    record = RequestRecord("r", PROMPT, params_record(params), 1, [[7, 8, 9, 10]], ["length"])
    state, replay = resumed_state(record, params, [1], tokenizer)
    assert replay == []
    assert state.samples[0].finish_reason is None and state.samples[0].token_ids == [7]


def test_worker_dying_after_the_last_completion_leaves_a_finished_stream_ok():
    """Every sample has its completion (the client holds the whole answer), then the decode
    server dies before its stream's EOF: the client's call must still end OK."""
    from pdserve.router.dispatch import Dispatcher
    from pdserve.router.responses import SampleProgressState, StreamState, completion
    from pdserve.router.worker_clients import WorkerClients

    class WorkerDiesAtEof:
        async def run(self, state, attempt, prompt_ids, params, carrier):
            state.samples[0].finish_reason = "length"
            yield completion(state, 0)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="Stream removed (Socket closed)")

    async def scenario():
        dispatcher = Dispatcher(None, None, WorkerClients())
        dispatcher.runner = WorkerDiesAtEof()
        state = StreamState("r", 3, [SampleProgressState()])
        got = []
        try:
            async for response in dispatcher._with_retries(state, PROMPT, SamplingParams(), {}):
                got.append(response)
        except grpc.aio.AioRpcError as exc:
            return got, exc.code()
        return got, None

    got, error = asyncio.run(scenario())
    assert got[0].complete.finish_reason == "length"
    assert error is None, f"a finished stream ended with {error}"


# ---------------------------------------------------------------- cluster reproductions

from pdserve.cli.cluster import LocalCluster  # noqa: E402

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(model_dir):
    with LocalCluster(model_dir, prefill=1, decode=1) as cluster:
        yield cluster


def _sampling(**kw) -> router_pb2.SamplingParams:
    base = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, seed=4242)
    base.update(kw)
    return router_pb2.SamplingParams(**base)


async def _collect(cluster, request: router_pb2.GenerateRequest, n: int = 1, cancel_at: int | None = None):
    """(tokens per sample, text per sample, completions, error)."""
    tokens, text, completions, error = [[] for _ in range(n)], ["" for _ in range(n)], [], None
    async with cluster.aio_channel(cluster.router_address) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60)
        try:
            async for r in call:
                if r.HasField("chunk"):
                    tokens[r.chunk.index] += r.chunk.token_ids
                    text[r.chunk.index] += r.chunk.text
                    if cancel_at is not None and len(tokens[0]) >= cancel_at:
                        call.cancel()
                        break
                else:
                    completions.append(r.complete)
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
    return tokens, text, completions, error


async def _seed_record(cluster, request_id: str, sampling: router_pb2.SamplingParams,
                       progress: list[list[int]]) -> None:
    """Write the Redis record the router would have written for this request, with `progress`
    recorded (the old router died before writing the rest)."""
    params = with_resolved_seed(sampling_params_from_proto(sampling))
    client = aioredis.from_url(cluster.redis_url)
    try:
        store = RequestStore(client, prefix=cluster.prefix)
        # A secured cluster's router records the API key's identity as the request's owner.
        owner = key_identity(cluster.security.api_key) if cluster.security else ""
        assert await store.create(request_id, PROMPT, params_record(params), params.seed, owner=owner)
        tokens = {i: t for i, t in enumerate(progress) if t}
        if tokens:
            assert await store.record_progress(request_id, tokens, {}, n=params.n)
    finally:
        await client.aclose()


async def _record_tokens(cluster, request_id: str) -> list[list[int]]:
    client = aioredis.from_url(cluster.redis_url)
    try:
        return (await RequestStore(client, prefix=cluster.prefix).get(request_id)).sent_tokens
    finally:
        await client.aclose()


def _request(request_id: str, sampling=None, **kw) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(request_id=request_id, sampling=sampling or _sampling(),
                                      prompt_token_ids=router_pb2.TokenIds(ids=PROMPT), **kw)


def _resume(request_id: str, received: list[int]) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(request_id=request_id, resume=True, received_tokens=received)


@pytest.fixture(scope="module")
def truth(cluster):
    tokens, text, completions, error = asyncio.run(_collect(cluster, _request("review-ref")))
    assert error is None and len(tokens[0]) == MAX_TOKENS
    return tokens[0], text[0]


def test_cluster_resume_ahead_of_redis_keeps_the_record_whole_and_a_second_resume_exact(cluster, truth):
    """Redis holds 4 tokens, the client 8 (router A died before its coalesced write). After the
    resume, completion_tokens and the Redis record count all of the client's tokens, so a client
    that disconnects and resumes again is continued from the right context."""
    want, want_text = truth

    async def scenario():
        await _seed_record(cluster, "ahead-1", _sampling(), [want[:4]])
        got, _, completions, error = await _collect(cluster, _resume("ahead-1", [8]))
        record = await _record_tokens(cluster, "ahead-1")
        # Second request: the client drops after 12 tokens, then resumes with 12.
        await _seed_record(cluster, "ahead-2", _sampling(), [want[:4]])
        first, _, _, _ = await _collect(cluster, _resume("ahead-2", [8]), cancel_at=4)
        held = want[:8] + first[0]
        while True:  # the router may still be closing the cancelled stream
            second, _, _, error2 = await _collect(cluster, _resume("ahead-2", [len(held)]))
            if error2 is None or not error2.startswith("ALREADY_EXISTS"):
                break
        return got[0], completions, error, record, held + second[0], error2

    got, completions, error, record, resumed_twice, error2 = asyncio.run(scenario())
    assert error is None and want[:8] + got == want  # the first resume itself is right
    problems = []
    if record[0] != want:
        problems.append(f"Redis record has {len(record[0])} tokens {record[0]}, the client holds {want}")
    if completions[0].completion_tokens != MAX_TOKENS:
        problems.append(f"completion_tokens {completions[0].completion_tokens}, the client holds {MAX_TOKENS}")
    if error2 is not None or resumed_twice != want:
        problems.append(f"second resume: error {error2}, tokens {resumed_twice} != {want}")
    assert not problems, "\n".join(problems)


def test_cluster_resume_when_redis_has_no_token_but_the_client_has_one(cluster, truth):
    """Router A sent the first token (from prefill) and died before recording it: resume with
    received_tokens=[1] must continue the stream, not fail."""
    want, _ = truth

    async def scenario():
        await _seed_record(cluster, "first-lost", _sampling(), [[]])
        return await _collect(cluster, _resume("first-lost", [1]))

    tokens, _, _, error = asyncio.run(scenario())
    assert error is None, error
    assert want[:1] + tokens[0] == want


def test_cluster_resume_n2_with_one_received_count(cluster):
    """n = 2, seeded: the client resumes with received_tokens=[3] ("missing entries count 0",
    router.proto) while Redis holds 5 tokens of each sample."""
    sampling = _sampling(n=2, temperature=0.8, seed=77, max_tokens=16)

    async def scenario():
        ref, _, _, error = await _collect(cluster, _request("n2-ref", sampling), n=2)
        assert error is None
        await _seed_record(cluster, "n2-resume", sampling, [ref[0][:5], ref[1][:5]])
        return ref, await _collect(cluster, _resume("n2-resume", [3]), n=2)

    ref, (tokens, _, _, error) = asyncio.run(scenario())
    assert error is None, error
    assert ref[0][:3] + tokens[0] == ref[0] and tokens[1] == ref[1]


def test_cluster_client_abort_before_the_first_token(cluster):
    """Abort(request_id) as soon as the router knows the request: Abort says found=True, so the
    stream must end with finish_reason "abort" (not an error status, not a normal "length")."""
    long_prompt = [2 + (i * 37) % 400 for i in range(1500)]

    async def one(i: int, stub, abort_stub):
        request = router_pb2.GenerateRequest(request_id=f"abort-{i}", sampling=_sampling(max_tokens=64),
                                             prompt_token_ids=router_pb2.TokenIds(ids=long_prompt))
        call = stub.Generate(request, timeout=60)
        reader = asyncio.ensure_future(_drain(call))
        found = False
        for _ in range(5000):
            if (await abort_stub.Abort(router_pb2.AbortRequest(request_id=f"abort-{i}"), timeout=5)).found:
                found = True
                break
            if reader.done():
                break
        return (found, await reader)

    async def _drain(call):
        finish, error = None, None
        try:
            async for r in call:
                if r.HasField("complete"):
                    finish = r.complete.finish_reason
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()[:80]}"
        return finish or error

    async def scenario():
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return [await one(i, stub, stub) for i in range(12)]

    outcomes = asyncio.run(scenario())
    assert all(found for found, _ in outcomes), outcomes  # the Abort reached the router in time
    assert all(o == "abort" for _, o in outcomes), outcomes


def test_a_live_but_failing_decode_server_is_avoided_on_retry(model_dir):
    """Two decode servers; one answers gRPC (GetLoad probes) but fails every request (here: a
    KV auth token the prefill server does not have -> FAILED_PRECONDITION, a worker failure).
    It reports more free blocks, so choose_decode prefers it, and the probe says it is alive:
    a retry must still avoid the worker that failed this request."""
    with LocalCluster(model_dir, prefill=1, decode=1) as cluster:
        cluster.role_env["decode"] = {"PDSERVE_KV_AUTH_TOKEN": "not-the-prefills", "PDSERVE_KV_CACHE_MB": "1024"}
        cluster.add_server("decode")

        async def scenario():
            return [await _collect(cluster, _request(f"bad-decode-{i}")) for i in range(3)]

        results = asyncio.run(scenario())
        log = cluster.servers("router")[0].log_path.read_text()
    errors = [error for _, _, _, error in results]
    assert errors == [None, None, None], (errors, log.count("retrying"))


def test_decode_kill_with_n2_seeded_stop_strings_and_logprobs_keeps_text_exact(model_dir):
    """The chaos tests use n=1 greedy streams and compare tokens only. Here: n=2 seeded samples
    with stop strings (some samples finish on them, at different times) and logprobs; a decode
    server is killed mid-run; tokens, text, finish reasons and logprobs must match a fault-free run."""
    import random

    from pdserve.bench.chaos import _busy_server, _loads_of, make_prompts

    prompts = make_prompts(16, seed=9)

    async def run(cluster, stop):
        async def one(i, prompt):
            sampling = router_pb2.SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, seed=1000 + i, n=2,
                                                 ignore_eos=True, logprobs=2, stop=stop)
            request = router_pb2.GenerateRequest(sampling=sampling, prompt_token_ids=router_pb2.TokenIds(ids=prompt))
            out = {"tokens": [[], []], "text": ["", ""], "lp": [[], []], "finish": [None, None], "error": None}
            try:
                async for r in stub.Generate(request, timeout=120):
                    if r.HasField("chunk"):
                        c = r.chunk
                        out["tokens"][c.index] += c.token_ids
                        out["text"][c.index] += c.text
                        out["lp"][c.index] += c.logprobs
                    else:
                        out["finish"][r.complete.index] = r.complete.finish_reason
            except grpc.aio.AioRpcError as exc:
                out["error"] = f"{exc.code().name}: {exc.details()}"
            return out

        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    async def killed_run(cluster, stop):
        baseline = sum(load.num_finished_requests for _, load in await _loads_of(cluster, "decode"))
        streams = asyncio.ensure_future(run(cluster, stop))
        victim = await _busy_server(cluster, "decode", baseline + 3, random.Random(1))
        cluster.kill(victim)
        return await streams

    with LocalCluster(model_dir, prefill=1, decode=2) as cluster:
        plain = asyncio.run(run(cluster, []))
        stop = sorted({plain[i]["text"][i % 2][12:14] for i in range(0, 16, 3)} - {""})
        want = asyncio.run(run(cluster, stop))
        got = asyncio.run(killed_run(cluster, stop))
        retried = cluster.servers("router")[0].log_path.read_text().count("retrying")
    assert retried > 0
    assert sum(f == "stop" for w in want for f in w["finish"]) > 0  # stop strings really finish samples
    bad = []
    for i, (w, g) in enumerate(zip(want, got)):
        for k in range(2):
            if (g["error"], g["tokens"][k], g["text"][k], g["finish"][k]) != (None, w["tokens"][k], w["text"][k],
                                                                              w["finish"][k]):
                bad.append((i, k, g["error"], g["text"][k], w["text"][k], g["finish"][k], w["finish"][k]))
            elif len(g["lp"][k]) != len(g["tokens"][k]) or any(abs(a - b) > 1e-3 for a, b in zip(g["lp"][k], w["lp"][k])):
                bad.append((i, k, "logprobs", len(g["lp"][k]), len(g["tokens"][k])))
    assert not bad, bad


def test_cluster_client_abort_during_prefill_ends_with_abort(cluster):
    """Abort (repeated every 2 ms until the stream ends) while a 3000-token prompt is in
    prefill: the decode reservation is dropped by the abort, so the Prefill's KV handshake or the
    Decode call answers NOT_FOUND and the client gets that status instead of finish "abort".
    Afterwards every KV block must be free again."""
    from pdserve.bench.chaos import wait_all_blocks_free

    prompt = [2 + (i * 37) % 400 for i in range(3000)]

    async def one(stub, i):
        rid = f"abort-prefill-{i}"
        call = stub.Generate(router_pb2.GenerateRequest(request_id=rid, sampling=_sampling(max_tokens=64),
                                                        prompt_token_ids=router_pb2.TokenIds(ids=prompt)), timeout=60)

        async def drain():
            finish = None
            try:
                async for r in call:
                    if r.HasField("complete"):
                        finish = r.complete.finish_reason
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()[:60]}"
            return finish

        reader = asyncio.ensure_future(drain())
        while not reader.done():
            await stub.Abort(router_pb2.AbortRequest(request_id=rid), timeout=5)
            await asyncio.sleep(0.002)
        return await reader

    async def scenario():
        async with cluster.aio_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            outcomes = [await one(stub, i) for i in range(6)]
        return outcomes, await wait_all_blocks_free(cluster)

    outcomes, loads = asyncio.run(scenario())
    assert all(l.num_blocks_free == l.num_blocks_total and l.num_reservations == 0 for l in loads.values()), loads
    assert all(o == "abort" for o in outcomes), outcomes


def test_started_request_continues_on_decode_when_no_prefill_server_is_registered(model_dir, truth):
    """A started request needs only a decode server (it recomputes prompt + tokens): with the
    prefill pool gone (its only server killed, registration expired) a resume still goes on."""
    from pdserve.state.registry import WorkerRegistry

    want, _ = truth
    with LocalCluster(model_dir, prefill=1, decode=1) as cluster:
        cluster.kill(cluster.servers("prefill")[0])

        async def scenario():
            client = aioredis.from_url(cluster.redis_url)
            try:
                registry = WorkerRegistry(client, prefix=cluster.prefix)
                for _ in range(200):  # the heartbeat key expires within 3 s
                    if not await registry.list("prefill"):
                        break
                    await asyncio.sleep(0.05)
            finally:
                await client.aclose()
            await _seed_record(cluster, "no-prefill", _sampling(), [want[:5]])
            return await _collect(cluster, _resume("no-prefill", [5]))

        tokens, _, _, error = asyncio.run(scenario())
    assert error is None, error
    assert want[:5] + tokens[0] == want
