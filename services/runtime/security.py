"""What each role builds from its security settings: the router's API-key check, and the KV
transfer port's TLS and shared token on both ends (TLS on gRPC servers and channels is
pdserve.runtime.tls and pdserve.runtime.channels)."""

from __future__ import annotations

import grpc

from pdserve.runtime.api_keys import ApiKeyInterceptor
from pdserve.runtime.health import service_names_of
from pdserve.runtime.tls import TlsConfig
from pdserve.v1 import router_pb2

KV_IDLE_TIMEOUT_S = 30.0


def router_interceptors(api_keys: tuple[str, ...]) -> list[grpc.aio.ServerInterceptor]:
    """The router's server interceptors: the API-key check on pdserve.v1.Router when keys are set."""
    return [ApiKeyInterceptor(api_keys, service_names_of(router_pb2))] if api_keys else []


def kv_sender_options(tls: TlsConfig | None, auth_token: str | None) -> dict:
    """TCPKVSender keyword arguments (prefill): a client TLS context (verifying the decode's
    certificate, presenting ours) when TLS is configured, and the KV token (blank: none)."""
    return {"ssl_context": tls.kv_client_context() if tls else None, "auth_token": auth_token or None,
            "server_hostname": tls.server_name if tls else None}


def kv_receiver_options(tls: TlsConfig | None, auth_token: str | None) -> dict:
    """TCPKVReceiver keyword arguments (decode): a server TLS context (client certificates
    required under mutual TLS) when TLS is configured, and the KV token (blank: none)."""
    return {"ssl_context": tls.kv_server_context() if tls else None, "auth_token": auth_token or None,
            # A sender silent this long mid-transfer is dropped (its reservation then fails or expires).
            "idle_timeout_s": KV_IDLE_TIMEOUT_S}
