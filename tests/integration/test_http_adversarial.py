"""The OpenAI-compatible front end under hostile clients (issue 22): oversized and slow bodies,
malformed JSON and out-of-range fields, dripped headers, idle and surplus connections, floods of
big chat prompts, and seeded random requests.

A real cluster (embedded Redis, a colocated worker, the router) serves two front ends: the
`pdserve serve openai` process with its production limits, and one in this process started by
`start_http` with short timeouts and small caps, so the tests need not wait 30 s for a timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from helpers.http_fuzz import Raw, RequestFuzzer, dumps
from helpers.http_testing import InProcessFrontEnd, assert_openai_error, call, drip, health_latency
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import MAX_POSITION_EMBEDDINGS, make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.limits import MAX_CHAT_CHARS, HttpOptions

SHORT = HttpOptions(body_read_timeout_s=1.0, keepalive_timeout_s=1.0, linger_s=0.5)
SLACK_S = 3.0  # allowance for a loaded 2-core machine on top of each timeout
BIG_CHARS = MAX_CHAT_CHARS - 50_000  # a chat message under the character cap: tokenized, then too long
FUZZ_COUNT = int(os.environ.get("PDSERVE_HTTP_FUZZ_COUNT", "300"))
FUZZ_SEED = int(os.environ.get("PDSERVE_HTTP_FUZZ_SEED", "22"))
GREEDY = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("http-adversarial") / "tiny", arch="llama", seed=0))


@pytest.fixture(scope="module")
def cluster(model_dir):
    with LocalCluster(model_dir, prefill=0, decode=0, colocated=1, openai=True) as c:
        yield c


@pytest.fixture(scope="module")
def short(cluster, model_dir):
    served = InProcessFrontEnd(cluster, model_dir, SHORT)
    yield served
    served.close()


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


# -- Sizes -------------------------------------------------------------------------------------


def test_a_30_mb_chat_message_is_refused_before_it_is_read(cluster):
    address = cluster.openai_address
    body = json.dumps(chat("x" * 30_000_000)).encode()
    # The status comes back as soon as the headers are in: measured without sending the body.
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.perf_counter()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        head = sock.recv(65536)
        headers_only_s = time.perf_counter() - start
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    # A whole upload, as a client sends it, with Content-Length and then chunked (no length known).
    start = time.perf_counter()
    status, _, reply = call(address, "POST", "/v1/chat/completions", body)
    whole_s = time.perf_counter() - start
    assert_openai_error(status, reply, 413)
    assert reply["error"]["code"] == "request_too_large"
    start = time.perf_counter()
    chunks = (body[i:i + 2**20] for i in range(0, len(body), 2**20))
    status, _, reply = call(address, "POST", "/v1/chat/completions", chunks)
    chunked_s = time.perf_counter() - start
    assert_openai_error(status, reply, 413)
    print(f"30 MB chat message: 413 after {headers_only_s * 1000:.1f} ms (headers only), "
          f"{whole_s * 1000:.1f} ms (whole upload), {chunked_s * 1000:.1f} ms (chunked upload)")
    assert headers_only_s < 2.0 and whole_s < 2.0 and chunked_s < 2.0


def test_health_answers_while_30_mb_messages_are_uploaded(cluster):
    address = cluster.openai_address
    body = json.dumps(chat("x" * 30_000_000)).encode()
    with ThreadPoolExecutor(5) as pool:
        uploads = [pool.submit(call, address, "POST", "/v1/chat/completions", body) for _ in range(5)]
        latencies = [health_latency(address)]
        while not all(u.done() for u in uploads):
            latencies.append(health_latency(address))
        statuses = [u.result()[0] for u in uploads]
    print(f"/health during five 30 MB uploads: {len(latencies)} calls, max {max(latencies) * 1000:.1f} ms")
    assert statuses == [413] * 5
    assert max(latencies) < 2.0


def test_health_answers_while_big_chat_prompts_are_tokenized(cluster, model_dir):
    """Chat prompts under the character cap are rendered and tokenized off the event loop: /health
    waits far less than one tokenization holding the loop would make it wait."""
    address = cluster.openai_address
    text = ("All work and no play makes a dull server. " * (BIG_CHARS // 42 + 1))[:BIG_CHARS]
    start = time.perf_counter()
    Tokenizer.from_dir(model_dir).encode(text, add_special_tokens=False)
    encode_s = time.perf_counter() - start
    body = json.dumps(chat(text)).encode()
    with ThreadPoolExecutor(5) as pool:
        prompts = [pool.submit(call, address, "POST", "/v1/chat/completions", body) for _ in range(5)]
        latencies = []
        while not all(p.done() for p in prompts):
            latencies.append(health_latency(address))
        replies = [p.result() for p in prompts]
    print(f"one tokenization holding the GIL: {encode_s * 1000:.0f} ms; /health during five big prompts: "
          f"{len(latencies)} calls, median {sorted(latencies or [0])[len(latencies) // 2] * 1000:.1f} ms, "
          f"max {max(latencies, default=0) * 1000:.1f} ms")
    for status, _, reply in replies:
        assert_openai_error(status, reply, 400, "messages")
        assert reply["error"]["code"] == "context_length_exceeded"
    # Held by tokenizing, /health would wait up to encode_s, a few times in all.
    assert len(latencies) >= 3
    assert sorted(latencies)[len(latencies) // 2] < 0.25 * encode_s
    assert max(latencies) < max(encode_s, 0.5)


def test_a_flood_of_chat_prompts_beyond_the_preparing_bound_gets_503(cluster, model_dir):
    served = InProcessFrontEnd(cluster, model_dir, SHORT, prepare_threads=1, max_preparing=1)
    try:
        big = json.dumps(chat("Tell me more. " * (BIG_CHARS // 14))).encode()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, served.address, "POST", "/v1/chat/completions", big)
            deadline = time.monotonic() + 30
            while served.front.preparing < 1 and not first.done():
                assert time.monotonic() < deadline, "the big prompt never started preparing"
                time.sleep(0.005)
            status, headers, reply = call(served.address, "POST", "/v1/chat/completions", chat("Hi"))
            assert_openai_error(status, reply, 503, None)
            assert reply["error"]["code"] == "server_busy" and headers["Retry-After"] == "1"
            assert first.result()[0] == 400
        status, _, reply = call(served.address, "POST", "/v1/chat/completions", chat("Hi", ignore_eos=True))
        assert status == 200 and reply["usage"]["completion_tokens"] == 2
        assert served.front.preparing == 0
    finally:
        served.close()


# -- Malformed input ---------------------------------------------------------------------------

DEEP = 100_000
DIGITS = Raw("9" * 5000)
COMPLETION_CASES = [
    ({"prompt": Raw("[" * DEEP + "]" * DEEP)}, "prompt"),
    ({"prompt": "x", "max_tokens": DIGITS}, "max_tokens"),
    ({"prompt": "x", "top_k": DIGITS}, "top_k"),
    ({"prompt": "x", "seed": DIGITS}, "seed"),
    ({"prompt": "x", "temperature": DIGITS}, "temperature"),
    ({"prompt": "x", "stop_token_ids": [DIGITS]}, "stop_token_ids"),
    ({"prompt": [1, 2, DIGITS]}, "prompt"),
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"prompt": ["ok", "\udfff"]}, "prompt"),
    ({"prompt": "x", "stop": ["\ud800"]}, "stop"),
    ({"prompt": "x", "top_k": 2**31}, "top_k"),
    ({"prompt": "x", "stop_token_ids": [2**32]}, "stop_token_ids"),
    ({"prompt": "x", "min_tokens": 2**32, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "x", "n": 2**40}, "n"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "temperature": 10**400}, "temperature"),
    ({"prompt": "x", "temperature": 1e-300}, "temperature"),
    ({"prompt": "x", "top_p": 1e-300}, "top_p"),
    ({"prompt": "x", "min_p": 5e-324}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"prompt": "x", "presence_penalty": -1e-300}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": 1e-40}, "frequency_penalty"),
    ({"prompt": "x", "stop_token_ids": [1] * 100_000}, "stop_token_ids"),
    ({"prompt": "x", "stop": ["s"] * 100_000}, "stop"),
    ({"prompt": ["x"] * 100_000}, "prompt"),
    ({"prompt": [5] * 100_000}, "prompt"),
    ({"prompt": "y" * 1_000_001}, "prompt"),
]
CHAT_CASES = [
    ({"messages": Raw("[" * DEEP + "]" * DEEP)}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": Raw('{"a":' * 5000 + "1" + "}" * 5000)}]},
     "messages"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "name": "\udc00"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": DIGITS}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 3000}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1000}]}, "messages"),
    ({"messages": [{"role": "user", "content": "z" * (MAX_CHAT_CHARS + 1)}]}, "messages"),
    ({"messages": [{"role": "user", "content": "z" * 600_000}] * 2}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"k": "v" * MAX_CHAT_CHARS}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": DIGITS}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2**64, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_POSITION_EMBEDDINGS}, "messages"),
]


@pytest.mark.parametrize("path,body,param", [("/v1/completions", b, p) for b, p in COMPLETION_CASES]
                         + [("/v1/chat/completions", b, p) for b, p in CHAT_CASES])
def test_malformed_and_out_of_range_fields_get_400_naming_the_field(cluster, path, body, param):
    status, _, reply = call(cluster.openai_address, "POST", path, dumps(body))
    assert_openai_error(status, reply, 400, param)
    assert reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"[" * DEEP + b"]" * DEEP, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                 b"9" * 5000, b'"\\ud800"', b"\xff\xfe{", b'{"prompt": "x"'])
def test_bodies_that_are_no_json_object_get_400(cluster, raw):
    status, _, reply = call(cluster.openai_address, "POST", "/v1/completions", raw)
    assert_openai_error(status, reply, 400)


# -- Slow and idle connections -----------------------------------------------------------------


def test_a_chunked_body_that_never_ends_gets_408_and_is_closed(short):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
    received, closed_s = drip(short.address, head, b"1\r\n \r\n", 30)
    print(f"dripped chunked body: closed after {closed_s} s")
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"request_timeout" in received and b"Connection: close" in received
    assert closed_s is not None and closed_s < SHORT.body_read_timeout_s + SHORT.linger_s + SLACK_S


def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(short):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    received, closed_s = drip(short.address, head, b"", 30)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert closed_s is not None and closed_s < SHORT.body_read_timeout_s + SHORT.linger_s + SLACK_S


def test_dripped_headers_are_cut_off(short):
    received, closed_s = drip(short.address, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-Drip: 1\r\n", 30)
    print(f"dripped headers: closed after {closed_s} s")
    assert received == b"" and closed_s is not None and closed_s < SHORT.keepalive_timeout_s + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(short):
    host, port = short.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            received += sock.recv(65536)
        answered = time.monotonic()
        assert received.startswith(b"HTTP/1.1 200")
        assert sock.recv(65536) == b""  # blocks until the server closes the idle connection
        idle_s = time.monotonic() - answered
    print(f"idle keep-alive connection closed after {idle_s:.2f} s")
    assert SHORT.keepalive_timeout_s * 0.5 < idle_s < SHORT.keepalive_timeout_s + SLACK_S


def _metric(address: str, name: str) -> float:
    _, _, text = call(address, "GET", "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_stream_whose_client_stops_reading_is_dropped_and_cancelled(cluster, model_dir):
    served = InProcessFrontEnd(cluster, model_dir, HttpOptions(stream_write_timeout_s=1.0))
    host, port = served.address.rsplit(":", 1)
    max_tokens = 2000
    try:
        # Big chunks (16 samples, 20 alternatives per token) back the server's writes up soon.
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "n": 16,
                           "logprobs": 20, "stream": True}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b'"id":"' not in received:  # the first event names the request; then read no more
                received += sock.recv(4096)
            request_id = received.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
            gone = 'pdserve_openai_requests_total{endpoint="/v1/completions",status="499"}'
            deadline = time.monotonic() + 60
            while _metric(served.address, gone) < 1:
                assert time.monotonic() < deadline, "the stream still waits on a client that reads nothing"
                time.sleep(0.05)
        # The gRPC call was cancelled: the router holds the request no more (a stalled relay would
        # hold it for as long as the client stays silent).
        router = next(p for p in cluster.processes if p.role == "router").metrics_address
        deadline = time.monotonic() + 10
        while _metric(router, "pdserve:router_requests_in_flight") != 0:
            assert time.monotonic() < deadline, f"the router still relays request {request_id}"
            time.sleep(0.05)
        assert _metric(served.address, "pdserve_openai_requests_in_flight") == 1  # (the /metrics call itself)
    finally:
        served.close()


def test_connections_over_the_cap_get_503_with_retry_after(cluster, model_dir):
    served = InProcessFrontEnd(cluster, model_dir, HttpOptions(max_connections=4))
    host, port = served.address.rsplit(":", 1)
    held = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(4)]
    try:
        for conn in held:  # answered, so the server holds each open connection from here on
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            assert response.status == 200 and response.read()
        status, headers, reply = call(served.address, "GET", "/v1/models")
        assert_openai_error(status, reply, 503, None)
        assert reply["error"]["code"] == "too_many_connections" and headers["Retry-After"] == "1"
        assert headers.get("Connection") == "close"
        assert health_latency(served.address) < 10  # probes are answered over the cap
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 10
        while call(served.address, "GET", "/v1/models")[0] != 200:
            assert time.monotonic() < deadline, "the cap still refuses after the connections closed"
            time.sleep(0.05)
    finally:
        for conn in held:
            conn.close()
        served.close()


# -- Random requests ---------------------------------------------------------------------------


def test_seeded_random_requests_get_no_5xx_and_leave_greedy_output_unchanged(cluster):
    address = cluster.openai_address
    status, _, before = call(address, "POST", "/v1/completions", GREEDY)
    assert status == 200
    vocab = Tokenizer.from_dir(cluster.model_dir).vocab_size
    cases = RequestFuzzer(FUZZ_SEED, vocab).cases(FUZZ_COUNT)

    def send(index: int):
        case = cases[index]
        try:
            return index, *call(address, "POST", case.path, case.body, case.headers)
        except (http.client.HTTPException, OSError) as error:  # the server dropped the connection
            return index, None, {}, f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, range(len(cases))))
    counts: dict[Any, int] = {}
    for index, status, headers, reply in results:
        counts[status] = counts.get(status, 0) + 1
        where = f"seed {FUZZ_SEED} case {index} ({cases[index].what}): {status} {str(reply)[:300]}"
        assert status is not None, where
        assert status < 500 or (status == 503 and reply["error"]["code"] in ("server_busy", "too_many_connections")), \
            where
        if status >= 400:
            assert_openai_error(status, reply, status)
        elif headers.get("Content-Type", "").startswith("text/event-stream"):
            assert reply.rstrip().endswith("data: [DONE]"), where
        else:
            assert reply["choices"] and reply["usage"]["completion_tokens"] >= 1, where
    print(f"{len(cases)} random requests (seed {FUZZ_SEED}): statuses {dict(sorted(counts.items()))}")
    assert health_latency(address) < 10
    status, _, after = call(address, "POST", "/v1/completions", GREEDY)
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]

