"""The cluster with security on, as real processes: mutual TLS on every gRPC server and channel and
on the KV transfer port, API keys on the router (the OpenAI front end sends one), a KV transfer
token, and a password on Redis. Generation works end to end; unauthenticated clients, workers'
callers and KV senders are refused; a request is bound to the key that made it (another key can
neither abort nor resume it); everything keeps serving after the refusals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from helpers.hf_reference import hf_greedy
from helpers.security_testing import make_pki
from pdserve.cli import healthcheck
from pdserve.cli import main as pdserve_main
from pdserve.cli.cluster import LocalCluster
from pdserve.cli.cluster_security import ClusterSecurity
from pdserve.kvtransfer import KVAuthError, KVLayout, KVTransferError, TCPKVSender
from pdserve.models.tiny_model import make_tiny_model
from pdserve.runtime.channels import CHANNEL_OPTIONS, ClientSecurity
from pdserve.runtime.tls import TlsConfig
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

API_KEY = "sk-router-7f3a"
OTHER_KEY = "sk-router-b41e"  # a second client's key: it may not touch API_KEY's requests
KV_TOKEN = "kv-token-91c2"
REDIS_PASSWORD = "redis-pass-5e1d"
MAX_TOKENS = 8
GREEDY = router_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def intruder(tmp_path_factory):
    """A CA and identity the cluster does not trust."""
    return make_pki(tmp_path_factory.mktemp("intruder"), name="intruder")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("secure") / "tiny", arch="llama", seed=0))


@pytest.fixture(scope="module")
def cluster(model_dir, pki, kv_transfer):
    security = ClusterSecurity(pki.ca_file, pki.cert_file, pki.key_file, api_key=API_KEY,
                               kv_auth_token=KV_TOKEN, redis_password=REDIS_PASSWORD)
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True, security=security,
                      role_env={"router": {"PDSERVE_API_KEY": f"{API_KEY},{OTHER_KEY}"}},
                      env={"PDSERVE_KV_TRANSFER": kv_transfer}) as c:
        yield c


def _tls(pki, ca=None, cert: bool = True) -> TlsConfig:
    return TlsConfig(pki.cert_file if cert else None, pki.key_file if cert else None, ca or pki.ca_file)


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(2, 500, (int(torch.randint(3, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


async def _generate_all(cluster: LocalCluster, prompts: list[list[int]]) -> list[list[int]]:
    async with cluster.aio_channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(prompt):
            request = router_pb2.GenerateRequest(prompt_token_ids=router_pb2.TokenIds(ids=prompt), sampling=GREEDY)
            return [t async for r in stub.Generate(request, timeout=120) for t in r.chunk.token_ids]

        return await asyncio.gather(*(one(p) for p in prompts))


def test_greedy_streams_through_the_secure_cluster_match_transformers(cluster, model_dir):
    prompts = _prompts(8)
    assert asyncio.run(_generate_all(cluster, prompts)) == hf_greedy(model_dir, prompts, MAX_TOKENS)


def _router_calls(stub: router_pb2_grpc.RouterStub, metadata=None):
    """One call of each kind the Router has (unary and server-streaming)."""
    yield lambda: list(stub.Generate(router_pb2.GenerateRequest(prompt="hi", sampling=GREEDY), timeout=10,
                                     metadata=metadata))
    yield lambda: stub.GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=10, metadata=metadata)
    yield lambda: stub.Tokenize(router_pb2.TokenizeRequest(text="hi"), timeout=10, metadata=metadata)
    yield lambda: stub.Abort(router_pb2.AbortRequest(request_id="x"), timeout=10, metadata=metadata)


def _assert_refused(channel: grpc.Channel, code: grpc.StatusCode, metadata=None, match: str = "") -> None:
    for call in _router_calls(router_pb2_grpc.RouterStub(channel), metadata):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == code, error.value
        assert match in error.value.details()


def test_router_refuses_clients_without_a_valid_api_key(cluster, pki):
    tls = _tls(pki)
    with ClientSecurity(tls).channel(cluster.router_address, CHANNEL_OPTIONS) as channel:
        _assert_refused(channel, grpc.StatusCode.UNAUTHENTICATED, match="no API key was sent")
        _assert_refused(channel, grpc.StatusCode.UNAUTHENTICATED, [("authorization", f"Basic {API_KEY}")],
                        match="the API key is not valid")
    with ClientSecurity(tls, "sk-wrong").channel(cluster.router_address, CHANNEL_OPTIONS) as channel:
        _assert_refused(channel, grpc.StatusCode.UNAUTHENTICATED, match="the API key is not valid")
    with cluster.channel(cluster.router_address) as channel:  # the right key: served (the router kept serving)
        info = router_pb2_grpc.RouterStub(channel).GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=10)
        assert info.max_model_len > 0


@pytest.mark.parametrize("case", ["plaintext", "no client certificate", "client certificate of another CA",
                                  "server not trusted"])
def test_router_refuses_clients_without_mutual_tls(cluster, pki, intruder, case):
    tls = {"plaintext": None, "no client certificate": _tls(pki, cert=False),
           "client certificate of another CA": TlsConfig(intruder.cert_file, intruder.key_file, pki.ca_file),
           "server not trusted": _tls(pki, ca=intruder.ca_file)}[case]
    with ClientSecurity(tls, API_KEY).channel(cluster.router_address, CHANNEL_OPTIONS) as channel:
        _assert_refused(channel, grpc.StatusCode.UNAVAILABLE)


def test_health_and_reflection_stay_open_without_an_api_key(cluster, pki):
    with cluster.channel(cluster.router_address, with_api_key=False) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in stream for s in r.list_services_response.service}
        assert "pdserve.v1.Router" in names
    tls_flags = ["--tls-cert", pki.cert_file, "--tls-key", pki.key_file, "--tls-ca", pki.ca_file]
    assert healthcheck.main([cluster.router_address, *tls_flags]) == 0
    assert healthcheck.main([cluster.router_address, "--timeout-s", "2"]) == 1  # plaintext: refused


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_serve_only_clients_with_a_trusted_certificate(cluster, pki, intruder, role):
    address = next(p.address for p in cluster.processes if p.role == role)
    with cluster.channel(address, with_api_key=False) as channel:  # the router's kind of client
        load = worker_pb2_grpc.WorkerControlStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        assert load.num_blocks_total > 0
    for tls in (None, _tls(pki, cert=False), TlsConfig(intruder.cert_file, intruder.key_file, pki.ca_file)):
        with ClientSecurity(tls).channel(address, CHANNEL_OPTIONS) as channel:
            with pytest.raises(grpc.RpcError) as error:
                worker_pb2_grpc.WorkerControlStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_decode_kv_port_refuses_unauthenticated_senders_and_keeps_serving(cluster, pki, intruder, model_dir):
    endpoint = next(p.kv_endpoint for p in cluster.processes if p.role == "decode")
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, dtype="float32")  # any layout:
    mtls = _tls(pki).kv_client_context()  # the token is checked before the layout
    refusals = [
        (TCPKVSender(layout, auth_token=KV_TOKEN), (OSError, KVTransferError)),  # plaintext to the TLS port
        (TCPKVSender(layout, _tls(pki, cert=False).kv_client_context(), KV_TOKEN), (OSError, KVTransferError)),
        (TCPKVSender(layout, TlsConfig(intruder.cert_file, intruder.key_file, pki.ca_file).kv_client_context(),
                     KV_TOKEN), (OSError, KVTransferError)),
        (TCPKVSender(layout, mtls), KVAuthError),  # no token
        (TCPKVSender(layout, mtls, "kv-token-wrong"), KVAuthError),
    ]
    for sender, refused in refusals:
        with pytest.raises(refused):
            sender.open(endpoint, "not-a-reservation", 4, timeout=10)
    with pytest.raises(KVTransferError) as past_auth:  # the right credentials get as far as the reservation
        TCPKVSender(layout, mtls, KV_TOKEN).open(endpoint, "not-a-reservation", 4, timeout=10)
    assert not isinstance(past_auth.value, KVAuthError)
    prompts = _prompts(2)  # the decode still receives KV from the prefill server
    assert asyncio.run(_generate_all(cluster, prompts)) == hf_greedy(model_dir, prompts, MAX_TOKENS)


def test_cancelled_stream_over_the_secure_channel_frees_its_blocks(cluster):
    async def cancel_mid_stream() -> int:
        async with cluster.aio_channel(cluster.router_address) as channel:
            call = router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
                prompt="a long story " * 10, sampling=router_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)))
            seen = 0
            async for response in call:
                seen += len(response.chunk.token_ids)
                if seen >= 3:
                    call.cancel()
                    break
            return seen

    assert asyncio.run(cancel_mid_stream()) >= 3
    deadline = time.monotonic() + 30
    while True:
        loads = []
        for proc in cluster.processes:
            if proc.role in ("prefill", "decode"):
                with cluster.channel(proc.address, with_api_key=False) as channel:
                    loads.append(worker_pb2_grpc.WorkerControlStub(channel).GetLoad(worker_pb2.GetLoadRequest(),
                                                                                    timeout=10))
        if all(load.num_blocks_free == load.num_blocks_total and load.num_reservations == 0 for load in loads):
            break
        assert time.monotonic() < deadline, f"KV blocks still held: {loads}"
        time.sleep(0.1)


def test_openai_front_end_reaches_the_router_with_mutual_tls_and_its_key(cluster):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    request = urllib.request.Request(f"http://{cluster.openai_address}/v1/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        completion = json.loads(response.read())
    assert completion["usage"]["completion_tokens"] == 4 and completion["choices"][0]["text"]


def test_generate_cli_sends_tls_identity_and_api_key(cluster, pki, capsys):
    argv = ["generate", "hello there", "--router", cluster.router_address, "--tls-cert", pki.cert_file,
            "--tls-key", pki.key_file, "--tls-ca", pki.ca_file, "--max-tokens", "3", "--temperature", "0",
            "--ignore-eos", "--json"]
    assert pdserve_main([*argv, "--api-key", API_KEY]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    assert pdserve_main(argv) == 2  # no key: one clear line, no traceback
    assert "answered UNAUTHENTICATED: no API key was sent" in capsys.readouterr().err


def test_secrets_stay_off_command_lines_and_redis_requires_the_password(cluster, model_dir):
    for proc in cluster.processes:
        cmdline = Path(f"/proc/{proc.process.pid}/cmdline").read_bytes()
        for secret in (API_KEY, KV_TOKEN, REDIS_PASSWORD):
            assert secret.encode() not in cmdline, (proc.role, secret)
    wrong = cluster.redis_url.replace(REDIS_PASSWORD, "not-the-password")
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "router", "--model", model_dir,
                             "--port", "0", "--redis-url", wrong], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"Redis at redis://:***@127.0.0.1:{cluster.redis.port}/0 refused this process's credentials" \
        in result.stderr, result.stderr[-2000:]
    assert "not-the-password" not in result.stderr + result.stdout


def test_a_request_is_bound_to_the_api_key_that_made_it(cluster, pki):
    """Key B cannot abort or resume key A's request: it gets what an unknown id gets (found=false,
    NOT_FOUND with the same details). Key A can do both."""
    request_id = f"bound-{uuid.uuid4().hex}"
    unknown_id = f"unknown-{uuid.uuid4().hex}"

    async def resume_error(stub, rid: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stream_all(stub.Generate(router_pb2.GenerateRequest(request_id=rid, resume=True), timeout=30))
        return error.value

    async def scenario():
        async with cluster.aio_channel(cluster.router_address) as a_channel, \
                ClientSecurity(_tls(pki), OTHER_KEY).aio_channel(cluster.router_address, CHANNEL_OPTIONS) as b_channel:
            a, b = router_pb2_grpc.RouterStub(a_channel), router_pb2_grpc.RouterStub(b_channel)
            call = a.Generate(router_pb2.GenerateRequest(
                request_id=request_id, prompt="a long story " * 10,
                sampling=router_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)), timeout=120)
            await call.read()  # streaming now
            b_abort = await b.Abort(router_pb2.AbortRequest(request_id=request_id), timeout=10)
            b_resume, b_unknown = await resume_error(b, request_id), await resume_error(b, unknown_id)
            still_streaming = (await call.read()).HasField("chunk")
            a_abort = await a.Abort(router_pb2.AbortRequest(request_id=request_id), timeout=10)
            ended = await read_rest(call)
            # The finished request stays recorded: its owner may resume it (and is replayed its
            # tokens and completion); the other key still may not.
            a_resumed = await stream_all(a.Generate(router_pb2.GenerateRequest(
                request_id=request_id, resume=True), timeout=30))
            b_after = await resume_error(b, request_id)
            return b_abort, b_resume, b_unknown, still_streaming, a_abort, ended, a_resumed, b_after

    b_abort, b_resume, b_unknown, still_streaming, a_abort, ended, a_resumed, b_after = asyncio.run(scenario())
    assert b_abort.found is False and still_streaming
    for refused in (b_resume, b_after):
        assert refused.code() == b_unknown.code() == grpc.StatusCode.NOT_FOUND
        assert refused.details() == b_unknown.details().replace(unknown_id, request_id)
    assert a_abort.found is True
    assert [r.complete.finish_reason for r in ended if r.HasField("complete")] == ["abort"]
    assert [r.complete.finish_reason for r in a_resumed if r.HasField("complete")] == ["abort"]


async def stream_all(call) -> list[router_pb2.GenerateResponse]:
    """Every response of a Generate call."""
    return [response async for response in call]


async def read_rest(call) -> list[router_pb2.GenerateResponse]:
    """The responses of a Generate call already read with read() (grpc.aio allows one style)."""
    rest = []
    while (response := await call.read()) is not grpc.aio.EOF:
        rest.append(response)
    return rest
