"""The OpenAI-compatible API driven by the official `openai` package against a real cluster
(embedded Redis, a prefill and a decode server, the router, `pdserve serve openai`)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

API_KEY = "sk-test-pdserve"
PROMPT = "Once upon a time, in a city of servers,"
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A short one."}]
NO_EOS = {"ignore_eos": True}  # vLLM's extension: random weights may emit eos at any point


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("openai") / "tiny", arch="llama", seed=0))


@pytest.fixture(scope="module")
def cluster(model_dir):
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True, openai_args=["--api-key", API_KEY]) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=f"http://{cluster.openai_address}/v1", api_key=API_KEY, max_retries=0,
                       timeout=120) as c:
        yield c


def _grpc_generate(cluster, sampling: router_pb2.SamplingParams, prompt: str | None = None,
                   ids: list[int] | None = None):
    """(text, token ids, Completion) from the router's own API."""
    request = router_pb2.GenerateRequest(prompt=prompt, sampling=sampling) if prompt is not None else \
        router_pb2.GenerateRequest(prompt_token_ids=router_pb2.TokenIds(ids=ids), sampling=sampling)
    text, tokens, done = "", [], None
    with cluster.channel(cluster.router_address) as channel:
        for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
            if response.HasField("chunk"):
                text += response.chunk.text
                tokens += response.chunk.token_ids
            else:
                done = response.complete
    return text, tokens, done


def _worker_loads(cluster):
    loads = []
    for proc in cluster.processes:
        if proc.role in ("prefill", "decode"):
            with cluster.channel(proc.address, with_api_key=False) as channel:
                loads.append((proc.role, worker_pb2_grpc.WorkerControlStub(channel).GetLoad(
                    worker_pb2.GetLoadRequest(), timeout=10)))
    return loads


def _wait_idle_with_all_blocks_free(cluster, timeout_s: float = 60.0):
    """Poll the workers' GetLoad (other processes) until nothing runs and every block is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = _worker_loads(cluster)
        if all(load.num_blocks_free == load.num_blocks_total and load.num_reservations == 0
               and load.num_running_requests == 0 and load.num_waiting_requests == 0 for _, load in loads):
            return loads
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still running or KV blocks still held: {loads}")
        time.sleep(0.05)


def _http(cluster, path: str, body: bytes | None = None, key: str | None = API_KEY):
    """(status, parsed JSON or text) of a raw HTTP call (for what the openai client cannot send)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"http://{cluster.openai_address}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def test_models_lists_the_served_model_and_health_needs_no_key(cluster, client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_dir]
    assert client.models.retrieve(model_dir).id == model_dir
    assert _http(cluster, "/health", key=None) == (200, {"status": "ok"})


def test_greedy_completion_equals_the_grpc_api(cluster, client, model_dir):
    text, tokens, done = _grpc_generate(cluster, router_pb2.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True), prompt=PROMPT)
    response = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body=NO_EOS)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert (choice.text, choice.finish_reason, choice.index) == (text, "length", 0)
    assert response.usage.prompt_tokens == done.prompt_tokens and response.usage.completion_tokens == 12
    assert response.usage.total_tokens == done.prompt_tokens + 12
    # The same prompt as token ids, in a batch with the text prompt: the same greedy tokens.
    ids = client.completions.create(model=model_dir, prompt=[PROMPT, "Hello"], max_tokens=12, temperature=0,
                                    extra_body=NO_EOS)
    hello, _, hello_done = _grpc_generate(cluster, router_pb2.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True), prompt="Hello")
    assert [c.text for c in ids.choices] == [text, hello]
    assert ids.usage.prompt_tokens == done.prompt_tokens + hello_done.prompt_tokens
    with cluster.channel(cluster.router_address) as channel:
        prompt_ids = list(router_pb2_grpc.RouterStub(channel).Tokenize(
            router_pb2.TokenizeRequest(text=PROMPT, add_special_tokens=True)).ids)
    by_ids = client.completions.create(model=model_dir, prompt=prompt_ids, max_tokens=12, temperature=0,
                                       extra_body=NO_EOS)
    assert by_ids.choices[0].text == text


def test_greedy_chat_uses_the_checkpoints_template_and_equals_the_grpc_api(cluster, client, model_dir):
    import transformers

    ids = transformers.AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    text, _, done = _grpc_generate(cluster, router_pb2.SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True), ids=list(ids))
    response = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_completion_tokens=10,
                                              temperature=0, extra_body=NO_EOS)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 10)
    assert done.prompt_tokens == len(ids)


def test_streamed_completion_equals_the_whole_one_and_ends_with_usage(client, model_dir):
    whole = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body=NO_EOS)
    chunks = list(client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=NO_EOS))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    plain = list(client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, temperature=0,
                                           stream=True, extra_body=NO_EOS))
    assert all(c.usage is None and c.choices for c in plain)


def test_streamed_chat_sends_the_role_then_content_then_usage(client, model_dir):
    whole = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=12, temperature=0,
                                           extra_body=NO_EOS)
    chunks = list(client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_samples_are_distinct_and_a_seed_reproduces_them(client, model_dir):
    def sample(seed, stream=False):
        kwargs = dict(model=model_dir, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=seed,
                      extra_body=NO_EOS)
        if not stream:
            return client.completions.create(**kwargs)
        texts = ["", "", ""]
        for chunk in client.completions.create(stream=True, **kwargs):
            texts[chunk.choices[0].index] += chunk.choices[0].text
        return texts

    first = sample(1234)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == 24
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1
    assert [c.text for c in sample(1234).choices] == texts
    assert sample(1234, stream=True) == texts
    chat = [client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=8, n=2, seed=99,
                                           extra_body=NO_EOS) for _ in range(2)]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]
    assert len(chat[0].choices) == 2 and chat[0].usage.completion_tokens == 16


def test_stop_string_ends_the_text_before_it(client, model_dir):
    full = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    cut = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body=NO_EOS).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_dir, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True, extra_body=NO_EOS))
    assert streamed == cut.text


def test_logprobs_in_both_shapes(client, model_dir):
    response = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                         extra_body=NO_EOS)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body=NO_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes and all(0 <= b < 256 for b in entry.bytes)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == chat.choices[0].message.content
    assert client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=2,
                                          extra_body=NO_EOS).choices[0].logprobs is None


def _reference_prompt_logprobs(model_dir, ids: list[int]) -> list[float]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_echo_with_logprobs_scores_the_prompt_on_the_prefill_server(cluster, client, model_dir):
    prompts = [[1, 17, 250, 31, 99, 4, 410], [1, 8, 8, 8, 300]]
    response = client.completions.create(model=model_dir, prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
    for choice, ids in zip(response.choices, prompts, strict=True):
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
        assert lp.token_logprobs[1:] == pytest.approx(_reference_prompt_logprobs(model_dir, ids), abs=1e-4)
        assert all(len(top) in (1, 2) and max(top.values()) >= logprob - 1e-6
                   for top, logprob in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert choice.finish_reason == "length" and choice.text == "".join(lp.tokens)
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == sum(map(len, prompts))
    # The prompt's scores, then the generated tokens' after them; streamed the same.
    generated = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                                          temperature=0, extra_body=NO_EOS).choices[0]
    plain = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, logprobs=2, temperature=0,
                                      extra_body=NO_EOS).choices[0]
    assert generated.text == PROMPT + plain.text
    # (The plain request's prompt comes from the prefix cache: a different batch shape, float32 rounding.)
    assert generated.logprobs.token_logprobs[-4:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    offsets = generated.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    streamed = list(client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                                              temperature=0, stream=True, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in streamed) == generated.text
    assert [lp for c in streamed if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs] \
        == generated.logprobs.token_logprobs
    no_logprobs = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=3, echo=True, temperature=0,
                                            stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in no_logprobs).startswith(PROMPT)
    _wait_idle_with_all_blocks_free(cluster)


def test_prompt_logprobs_in_the_grpc_api_come_once_before_the_tokens(cluster):
    ids = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]
    request = router_pb2.GenerateRequest(prompt_token_ids=router_pb2.TokenIds(ids=ids), sampling=router_pb2.SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=3, n=2))
    with cluster.channel(cluster.router_address) as channel:
        kinds = [r.WhichOneof("kind") for r in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120)]
        scores = next(r.prompt_logprobs for r in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120)
                      if r.HasField("prompt_logprobs"))
    assert kinds[0] == "prompt_logprobs" and kinds.count("prompt_logprobs") == 1 and kinds.count("complete") == 2
    assert list(scores.token_ids) == ids and len(scores.logprobs) == len(ids) - 1
    assert list(scores.logprobs) == pytest.approx(_reference_prompt_logprobs(cluster.model_dir, ids), abs=1e-4)
    assert all(len(top.token_ids) == 3 for top in scores.top_logprobs)


def test_logit_bias_steers_the_tokens(client, model_dir):
    from pdserve.models.tokenizer import Tokenizer

    favoured = Tokenizer.from_dir(model_dir).decode([300], skip_special_tokens=False)
    plain = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, temperature=0,
                                      extra_body=NO_EOS).choices[0]
    pushed = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={"300": 100}, logprobs=0, extra_body=NO_EOS).choices[0]
    assert pushed.logprobs.tokens == [favoured] * 4 and plain.text != pushed.text
    chat = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logit_bias={"300": 100}, logprobs=True, extra_body=NO_EOS)
    assert [e.token for e in chat.choices[0].logprobs.content] == [favoured] * 3


def test_max_tokens_bounds_the_output(client, model_dir):
    # (max_tokens 1 finishes at prefill, which leaves the decode reservation to its lease in the
    # current router; 2 keeps this module's block accounting exact.)
    for max_tokens in (2, 5):
        response = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=max_tokens,
                                             extra_body=NO_EOS)
        assert response.usage.completion_tokens == max_tokens and response.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=3, extra_body=NO_EOS)
    assert chat.usage.completion_tokens == 3


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"), (dict(n=0), "n"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=10**6), "max_tokens"), (dict(logprobs=50), "logprobs"),
    (dict(prompt=[]), "prompt"), (dict(prompt=[[]]), "prompt"), (dict(stop=["x"] * 20), "stop"),
    (dict(stream_options={"include_usage": True}), "stream_options"), (dict(echo=1), "echo"),
    (dict(logit_bias={"5": 101}), "logit_bias"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={str(10**6): 1}), "logit_bias"), (dict(max_tokens=0, echo=False), "max_tokens"),
    (dict(prompt=[[1, 2, 10**6]]), "prompt"), (dict(extra_body={"top_k": -5}), "top_k"),
])
def test_bad_completion_requests_get_400_in_openais_shape(client, model_dir, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_dir, **{"prompt": PROMPT, **kwargs})
    assert error.value.status_code == 400 and error.value.param == param
    body = error.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


@pytest.mark.parametrize("kwargs,param", [
    (dict(messages=[]), "messages"), (dict(messages=[{"role": "robot", "content": "x"}]), "messages"),
    (dict(top_logprobs=2), "top_logprobs"), (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
])
def test_bad_chat_requests_get_400(client, model_dir, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_dir, **{"messages": MESSAGES, **kwargs})
    assert error.value.param == param


def test_prompt_too_long_for_the_context_is_a_400_from_the_router(client, model_dir):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_dir, prompt=[5] * 4090, max_tokens=10)
    assert error.value.code == "context_length_exceeded" and error.value.param == "prompt"


def test_unknown_model_route_and_bad_json(cluster, client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert (error.value.code, error.value.param) == ("model_not_found", "model")
    status, body = _http(cluster, "/v1/no-such-route", b"{}")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    status, body = _http(cluster, "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = _http(cluster, "/v1/completions", b"[1, 2]")
    assert status == 400 and body["error"]["message"]


def test_api_key_is_enforced(cluster, model_dir):
    with openai.OpenAI(base_url=f"http://{cluster.openai_address}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as error:
            bad.completions.create(model=model_dir, prompt=PROMPT, max_tokens=2)
        assert error.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    status, body = _http(cluster, "/v1/models", key=None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


def test_without_api_keys_the_api_is_open(cluster, model_dir):
    """A second front end on the same router, in this process, configured with no keys."""
    from pdserve.openai.frontend import Frontend, FrontendConfig
    from pdserve.openai.server import start_http

    async def run():
        front = await Frontend.connect(FrontendConfig(router=cluster.router_address, model_dir=model_dir,
                                                      model_name="tiny",
                                                      router_security=cluster.client_security()))
        runner = await start_http(front, "127.0.0.1", 0)
        try:
            host, port = runner.addresses[0][:2]
            async with openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key="anything",
                                          max_retries=0) as client:
                models = await client.models.list()
                response = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                                           extra_body=NO_EOS)
            return [m.id for m in models.data], response
        finally:
            await runner.cleanup()
            await front.close()

    names, response = asyncio.run(run())
    assert names == ["tiny"] and response.model == "tiny" and response.usage.completion_tokens == 3


def _request_record(cluster, request_id: str):
    """The router's record of a request in Redis (prompt, tokens streamed, finish reasons)."""
    import redis.asyncio as aioredis

    from pdserve.state.request_store import RequestStore

    async def read():
        client = aioredis.from_url(cluster.redis_url)
        try:
            return await RequestStore(client, prefix=cluster.prefix).get(request_id)
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_client_disconnect_mid_stream_aborts_the_request_and_frees_blocks(cluster, client, model_dir):
    _wait_idle_with_all_blocks_free(cluster)
    stream = client.completions.create(model=model_dir, prompt=PROMPT * 4, max_tokens=3000, stream=True,
                                       extra_body=NO_EOS)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 5:
            break
    stream.close()  # drops the connection mid-stream
    assert len(chunks) == 5
    _wait_idle_with_all_blocks_free(cluster)
    # The router stopped relaying (its record of the request never reached 3000 tokens nor a
    # finish reason): the front end cancelled the gRPC call and the request was aborted.
    record = _request_record(cluster, f"{chunks[0].id}-0")
    assert record is not None and record.finished[0] in (None, "abort")
    assert 5 <= len(record.sent_tokens[0]) < 3000


def test_metrics_count_requests_by_endpoint_and_status(cluster, client, model_dir):
    client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=-2)
    status, text = _http(cluster, "/metrics", key=None)
    assert status == 200
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['pdserve_openai_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert lines['pdserve_openai_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert lines['pdserve_openai_request_duration_seconds_count{endpoint="/v1/completions"}'] >= 2
    assert lines["pdserve_openai_completion_tokens_total"] >= 2
