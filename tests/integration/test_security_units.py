"""Security pieces without a cluster: TLS config validation, API-key checks, URL redaction, the
KV transfer port under mutual TLS + token (real sockets), and Redis AUTH / rediss:// against a
real valkey-server (TLS through a TLS-terminating relay, as stunnel would put in front of it)."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from helpers.kv_testing import LAYOUT, NUM_BLOCKS, Outcomes, assert_blocks_equal, random_caches, send_all, zero_caches
from helpers.security_testing import TlsTerminatingProxy, make_pki
from pdserve.kvtransfer import KVAuthError, KVTransferError, TCPKVReceiver, TCPKVSender
from pdserve.kvtransfer.tcp_sender import parse_endpoint
from pdserve.runtime.api_keys import ApiKeyChecker, parse_api_keys
from pdserve.runtime.tls import TlsConfig, TlsConfigError
from pdserve.state.embedded_redis import EmbeddedRedis
from pdserve.state.redis_connect import RedisSetupError, check_redis, open_redis, redact_url


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """An unrelated CA and identity (not trusted by `pki`)."""
    return make_pki(tmp_path_factory.mktemp("other"), name="intruder")


# --- TLS configuration ------------------------------------------------------------------------

def test_tls_config_rejects_incomplete_or_bad_files(pki, other_pki, tmp_path):
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    cases = [
        (dict(cert_file=pki.cert_file), "--tls-cert and --tls-key go together"),
        (dict(key_file=pki.key_file), "--tls-cert and --tls-key go together"),
        (dict(cert_file=str(tmp_path / "missing.pem"), key_file=pki.key_file), "--tls-cert .*cannot read"),
        (dict(ca_file=str(not_pem)), "--tls-ca .*not a PEM file"),
        (dict(cert_file=pki.cert_file, key_file=other_pki.key_file), "not a matching certificate and key"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TlsConfigError, match=message):
            TlsConfig(**kwargs)


def test_tls_flags_to_config(pki):
    from argparse import Namespace

    from pdserve.cli.flags import tls_from
    from pdserve.settings import ServerSettings

    plain = Namespace(tls_cert=None, tls_key=None, tls_ca=None, tls_server_name=None, tls=False)
    assert tls_from(plain) is None and ServerSettings(tls=tls_from(plain)).tls is None
    client = Namespace(**{**vars(plain), "tls_ca": pki.ca_file})
    assert tls_from(client) == TlsConfig(ca_file=pki.ca_file)
    with pytest.raises(TlsConfigError, match="server .* also needs --tls-cert"):
        ServerSettings(tls=tls_from(client))
    server = Namespace(**{**vars(client), "tls_cert": pki.cert_file, "tls_key": pki.key_file,
                          "tls_server_name": "pdserve"})
    config = ServerSettings(tls=tls_from(server)).tls
    assert config.mutual and config.channel_options() == [("grpc.ssl_target_name_override", "pdserve")]


# --- API keys ---------------------------------------------------------------------------------

def test_api_key_checker_accepts_only_bearer_with_a_configured_key():
    checker = ApiKeyChecker(parse_api_keys(" k1 , ,k2-long-key,"))
    assert checker.accepts("Bearer k1") and checker.accepts("bearer k2-long-key")
    for header in (None, "", "Bearer", "Bearer ", "Bearer k3", "Basic k1", "k1", "Bearer k1x", "Bearer k"):
        assert not checker.accepts(header), header
    with pytest.raises(ValueError, match="at least one"):
        ApiKeyChecker([])


def test_redact_url_hides_passwords_only():
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:p%40ss@h:6380/1?ssl_cert_reqs=required") == \
        "rediss://user:***@h:6380/1?ssl_cert_reqs=required"
    assert redact_url("unix:///tmp/r.sock?db=0&password=s3cret") == "unix:///tmp/r.sock?db=0&password=***"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --- KV transfer port under mutual TLS + token --------------------------------------------------

def _open(sender: TCPKVSender, endpoint: str, rid: str):
    return sender.open(endpoint, rid, 8, timeout=5)


def test_kv_port_with_mutual_tls_and_token_refuses_unauthenticated_senders(pki, other_pki):
    tls = TlsConfig(pki.cert_file, pki.key_file, pki.ca_file)
    dst = zero_caches(LAYOUT, NUM_BLOCKS)
    rx = TCPKVReceiver(dst, ssl_context=tls.kv_server_context(), auth_token="kv-t0ken", handshake_timeout_s=5)
    endpoint = rx.start()
    no_cert = TlsConfig(ca_file=pki.ca_file).kv_client_context()
    wrong_ca = TlsConfig(other_pki.cert_file, other_pki.key_file, pki.ca_file).kv_client_context()
    try:
        rx.expect("r", [3, 4], 8, Outcomes())
        refused = {
            "plaintext": TCPKVSender(LAYOUT, auth_token="kv-t0ken"),
            "TLS without a client certificate": TCPKVSender(LAYOUT, no_cert, "kv-t0ken"),
            "client certificate from another CA": TCPKVSender(LAYOUT, wrong_ca, "kv-t0ken"),
        }
        for what, sender in refused.items():
            with pytest.raises((OSError, KVTransferError)):
                _open(sender, endpoint, "r")
                pytest.fail(f"{what}: accepted")
        for token in (None, "wrong", "kv-t0ke", "kv-t0ken "):
            with pytest.raises(KVAuthError, match="token is missing or wrong"):
                _open(TCPKVSender(LAYOUT, tls.kv_client_context(), token), endpoint, "r")
        with socket.create_connection(parse_endpoint(endpoint), timeout=5) as raw:  # random bytes, no TLS
            raw.sendall(b"\x00garbage" * 64)
            try:
                assert raw.recv(1024) == b""  # closed without a word...
            except ConnectionResetError:
                pass  # ...or reset
        src, outcomes = random_caches(LAYOUT, NUM_BLOCKS, seed=3), Outcomes()
        rx.expect("ok", [7, 9], 8, outcomes)
        transfer = _open(TCPKVSender(LAYOUT, tls.kv_client_context(), "kv-t0ken"), endpoint, "ok")
        send_all(transfer, src, [1, 2])
        transfer.finish(timeout=10)
        assert outcomes.wait("ok") is None  # still serving, and "r" was never bound
        assert_blocks_equal(dst, [7, 9], src, [1, 2])
        assert rx.cancel("r")
    finally:
        rx.stop()


def test_kv_sender_checks_the_receivers_certificate(pki, other_pki):
    impostor = TlsConfig(other_pki.cert_file, other_pki.key_file)
    rx = TCPKVReceiver(zero_caches(LAYOUT, NUM_BLOCKS), ssl_context=impostor.kv_server_context())
    endpoint = rx.start()
    try:
        rx.expect("r", [1, 2], 8, Outcomes())
        sender = TCPKVSender(LAYOUT, TlsConfig(pki.cert_file, pki.key_file, pki.ca_file).kv_client_context(), "t")
        with pytest.raises(ssl.SSLCertVerificationError):
            _open(sender, endpoint, "r")
    finally:
        rx.stop()


# --- Redis AUTH and rediss:// -------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_with_password():
    with EmbeddedRedis(password="p@ss w0rd") as server:
        yield server


def _run(coroutine):
    return asyncio.run(coroutine)


async def _set_get(url: str, ca_file: str | None = None) -> bytes:
    client = open_redis(url, ca_file)
    try:
        await check_redis(client, url)
        await client.set("pdserve-security", b"v", ex=10)
        return await client.get("pdserve-security")
    finally:
        await client.aclose()


def test_redis_password_in_the_url(redis_with_password):
    url = redis_with_password.url
    assert "p%40ss%20w0rd@" in url
    assert _run(_set_get(url)) == b"v"
    port = redis_with_password.port
    for bad in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong-pass@127.0.0.1:{port}/0",
                f"redis://someone:p%40ss%20w0rd@127.0.0.1:{port}/0"):
        with pytest.raises(RedisSetupError) as error:
            _run(_set_get(bad))
        message = str(error.value)
        assert redact_url(bad) in message and "credentials" in message
        assert "wrong-pass" not in message and "w0rd" not in message


def test_rediss_url_verifies_the_server_with_redis_ca(redis_with_password, pki, other_pki):
    context = TlsConfig(pki.cert_file, pki.key_file).kv_server_context()
    proxy = TlsTerminatingProxy(context, ("127.0.0.1", redis_with_password.port))
    try:
        url = f"rediss://:p%40ss%20w0rd@127.0.0.1:{proxy.port}/0"
        assert _run(_set_get(url, pki.ca_file)) == b"v"
        assert _run(_set_get(url + f"?ssl_ca_certs={pki.ca_file}")) == b"v"  # redis-py's own parameter
        with pytest.raises(RedisSetupError, match=r"cannot reach Redis at rediss://:\*\*\*@.*certificate verify"):
            _run(_set_get(url, other_pki.ca_file))
        with pytest.raises(RedisSetupError, match="not a rediss:// URL"):
            open_redis(redis_with_password.url, pki.ca_file)
    finally:
        proxy.close()
