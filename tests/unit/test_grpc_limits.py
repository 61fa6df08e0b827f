"""Limits on what a Router client controls, and who a call is from, in one process: list sizes
refused before the list is read, integer fields bounded to what the wire carries, the request
id's length and characters, and the caller identity the router binds requests to (an API key's
hash, a client certificate's, or the shared open identity), through real grpc.aio servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from helpers.security_testing import make_pki
from pdserve.models.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams, SamplingParamsError
from pdserve.router.identity import caller_identity
from pdserve.router.request_limits import MAX_REQUEST_ID_CHARS, check_received_tokens, check_request_id
from pdserve.runtime.api_keys import key_identity
from pdserve.runtime.channels import ClientSecurity
from pdserve.runtime.errors import InvalidRequestError
from pdserve.runtime.health import service_names_of
from pdserve.runtime.sampling_proto import sampling_params_from_proto
from pdserve.runtime.security import router_interceptors
from pdserve.runtime.server import start_server_with_health
from pdserve.runtime.tls import TlsConfig
from pdserve.v1 import router_pb2, router_pb2_grpc
from pdserve.workers import request_checks

HUGE = 5_000_000


class Unreadable(Sequence):
    """A list of `length` items that fails the test if anything reads an item."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        raise AssertionError("an oversized list was read before its length was checked")


def test_oversized_lists_are_refused_by_length_before_being_read():
    with pytest.raises(SamplingParamsError, match=f"stop_token_ids has {HUGE} ids; the limit is 1024"):
        SamplingParams(stop_token_ids=Unreadable(HUGE))
    with pytest.raises(SamplingParamsError, match="at most 16 stop strings, got 17"):
        SamplingParams(stop=Unreadable(17))
    # The public message's repeated field goes in as it is, and is refused the same way.
    message = router_pb2.SamplingParams(stop_token_ids=[7] * HUGE)
    with pytest.raises(SamplingParamsError, match=f"^stop_token_ids has {HUGE} ids"):
        sampling_params_from_proto(message)
    assert SamplingParams(stop_token_ids=[7] * MAX_STOP_TOKEN_IDS).stop_token_ids == (7,) * MAX_STOP_TOKEN_IDS


@pytest.mark.parametrize("fields, message", [
    (dict(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids has 1025 ids; the limit is 1024"),
    (dict(top_k=2**31), "top_k must be at most 2147483647, got 2147483648"),
    (dict(top_k=-2), "top_k must be -1, 0 (off) or a positive count, got -2"),
    (dict(max_tokens=2**32), "max_tokens must be at most 4294967295"),
    (dict(seed=2**64), "seed must be in [0, 2^64)"),
    (dict(seed=-1), "seed must be in [0, 2^64)"),
    (dict(n=17), "n must be in [1, 16], got 17"),
    (dict(logprobs=21), "logprobs must be in [0, 20], got 21"),
])
def test_sampling_fields_out_of_range_are_named(fields, message):
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**fields)
    assert message in str(error.value)
    assert str(error.value).split(" ", 1)[0] in fields  # the message starts with the field (HTTP names it)


def test_sampling_fields_at_their_limits_are_accepted():
    params = SamplingParams(top_k=2**31 - 1, max_tokens=2**32 - 1, seed=2**64 - 1, n=16, logprobs=20)
    assert (params.top_k, params.seed) == (2**31 - 1, 2**64 - 1)


VALID_IDS = ["", "r", "dup-id", "abort-3", f"cmpl-{uuid.uuid4().hex}-0", f"chatcmpl-{uuid.uuid4().hex}",
             str(uuid.uuid4()), "a.b_c+d=e/f@g", "x" * MAX_REQUEST_ID_CHARS]


@pytest.mark.parametrize("request_id", VALID_IDS)
def test_request_ids_clients_use_are_accepted(request_id):
    check_request_id(request_id)
    if request_id:  # and the workers accept the attempt ids the router derives from them
        request_checks.check_request_id(f"{request_id}~{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("request_id, shown", [
    ("ok\nFORGED", r"'\n' at position 2"), ("ok\rFORGED", r"'\r' at position 2"),
    ("a\x1b[2K", r"'\x1b' at position 1"), ("a b", "' ' at position 1"), ("tab\t", r"'\t' at position 3"),
    ("nul\x00", r"'\x00' at position 3"), ("a\u2028b", r"'\u2028' at position 1"), ("é", "'é' at position 0"),
    ("a:tokens:0", "':' at position 1"), ("a~1234abcd", "'~' at position 1"),
])
def test_request_ids_that_could_forge_logs_or_keys_are_refused(request_id, shown):
    with pytest.raises(InvalidRequestError) as error:
        check_request_id(request_id)
    assert str(error.value).startswith("request_id may hold only letters, digits and")
    assert shown in str(error.value)


def test_request_id_length_and_resume_counts_are_bounded():
    with pytest.raises(InvalidRequestError, match=f"request_id has 201 characters; the limit is {MAX_REQUEST_ID_CHARS}"):
        check_request_id("x" * (MAX_REQUEST_ID_CHARS + 1))
    check_received_tokens(16)
    with pytest.raises(InvalidRequestError, match="received_tokens has 17 entries"):
        check_received_tokens(17)


def test_workers_refuse_ids_with_control_characters_or_spaces():
    for bad in ("a\nb", "a b", "a\x7f", "é"):
        with pytest.raises(InvalidRequestError, match="printable ASCII"):
            request_checks.check_request_id(bad)


# ----- who is calling ------------------------------------------------------------------------

class IdentityEcho(router_pb2_grpc.RouterServicer):
    """Answers each call with caller_identity(context): unary in model_name, streaming in the
    responses' request_id (the two handler kinds the API-key interceptor wraps)."""

    async def GetModelInfo(self, request, context):
        return router_pb2.ModelInfo(model_name=caller_identity(context))

    async def Generate(self, request, context):
        for _ in range(2):
            yield router_pb2.GenerateResponse(request_id=caller_identity(context))


async def _identities(tls: TlsConfig | None, keys: tuple[str, ...], clients: list[ClientSecurity]) -> list[set[str]]:
    """Start a real server (TLS when given, API keys when given) and return, per client, the
    identities it was seen with over two unary and one streaming call."""
    running = await start_server_with_health(lambda s: router_pb2_grpc.add_RouterServicer_to_server(IdentityEcho(), s),
                                             service_names_of(router_pb2), "127.0.0.1", 0, tls=tls,
                                             interceptors=router_interceptors(keys))
    try:
        seen = []
        for client in clients:
            async with client.aio_channel(f"127.0.0.1:{running.port}", []) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                got = {(await stub.GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=10)).model_name
                       for _ in range(2)}
                got |= {r.request_id async for r in stub.Generate(router_pb2.GenerateRequest(), timeout=10)}
                seen.append(got)
        return seen
    finally:
        await running.server.stop(0)


def test_an_api_key_is_the_callers_identity_as_a_hash():
    keys = ("sk-key-a", "sk-key-b")
    a, b, a_again = asyncio.run(_identities(None, keys, [ClientSecurity(None, k) for k in (*keys, keys[0])]))
    assert a == a_again == {key_identity("sk-key-a")}  # stable across calls, call kinds and connections
    assert b == {key_identity("sk-key-b")} and a != b
    assert all(key not in identity for identity in a | b for key in keys)


def test_open_deployment_callers_share_one_empty_identity():
    assert asyncio.run(_identities(None, (), [ClientSecurity(None), ClientSecurity(None, "sk-unchecked")])) \
        == [{""}, {""}]


def test_a_client_certificate_is_the_callers_identity_under_mutual_tls(tmp_path: Path):
    server = make_pki(tmp_path / "server", name="server")
    other = make_pki(tmp_path / "other", name="other-client")
    bundle = tmp_path / "client-cas.pem"  # the server accepts clients of either CA
    bundle.write_bytes(Path(server.ca_file).read_bytes() + Path(other.ca_file).read_bytes())
    tls = TlsConfig(server.cert_file, server.key_file, str(bundle))
    first = ClientSecurity(TlsConfig(server.cert_file, server.key_file, server.ca_file))
    second = ClientSecurity(TlsConfig(other.cert_file, other.key_file, server.ca_file))
    one, two, one_again = asyncio.run(_identities(tls, (), [first, second, first]))
    assert one == one_again and len(one) == 1 and next(iter(one)).startswith("cert:")
    assert len(two) == 1 and two != one
    # With API keys as well, the key decides: one key is one caller whatever its certificate.
    with_keys = asyncio.run(_identities(tls, ("sk-k",), [ClientSecurity(c.tls, "sk-k") for c in (first, second)]))
    assert with_keys == [{key_identity("sk-k")}] * 2
