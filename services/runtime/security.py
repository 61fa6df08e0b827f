"""The security flags of `pdserve serve ROLE` and what each role builds from them: TLS on its
gRPC server and on the channels it opens, the router's API-key check, the KV transfer port's
TLS and shared token. Secrets are best passed through the PDSERVE_* environment variables
(command lines are visible to every user of the machine)."""

from __future__ import annotations

import argparse

import grpc

from pdserve.cli.env import add_flag
from pdserve.runtime.api_keys import ApiKeyInterceptor, parse_api_keys
from pdserve.runtime.channels import ClientSecurity
from pdserve.runtime.health import service_names_of
from pdserve.runtime.tls import TlsConfig, add_tls_flags
from pdserve.v1 import router_pb2


def add_server_security_flags(parser: argparse.ArgumentParser) -> None:
    """TLS flags, --kv-auth-token, --router-api-key and --redis-ca (--api-key is the role's own)."""
    add_tls_flags(parser)
    add_flag(parser, "--kv-auth-token", None, str, "prefill/decode: shared secret of the KV transfer port; the "
             "decode refuses senders that do not present it (set the same value on both)")
    add_flag(parser, "--router-api-key", None, str, "openai: the API key it sends to the router "
             "(one of the router's --api-key keys)")
    add_flag(parser, "--redis-ca", None, str, "PEM CA bundle verifying a rediss:// Redis "
             "(default: the system's roots; user:password@ in --redis-url for AUTH/ACL)")


def router_interceptors(ns: argparse.Namespace) -> list[grpc.aio.ServerInterceptor]:
    """The router's server interceptors: the API-key check on pdserve.v1.Router when --api-key is set."""
    keys = parse_api_keys(getattr(ns, "api_key", None))
    return [ApiKeyInterceptor(keys, service_names_of(router_pb2))] if keys else []


def router_client_security(ns: argparse.Namespace) -> ClientSecurity:
    """How the OpenAI front end dials the router: the TLS flags and --router-api-key."""
    return ClientSecurity(TlsConfig.from_namespace(ns), getattr(ns, "router_api_key", None) or None)


def kv_auth_token(ns: argparse.Namespace) -> str | None:
    """The KV transfer token, None when unset (blank counts as unset)."""
    token = getattr(ns, "kv_auth_token", None)
    return token or None


def kv_sender_options(ns: argparse.Namespace) -> dict:
    """TCPKVSender keyword arguments (prefill): a client TLS context (verifying the decode's
    certificate, presenting ours) when TLS is configured, and the KV token."""
    tls = TlsConfig.for_server(ns)
    return {"ssl_context": tls.kv_client_context() if tls else None, "auth_token": kv_auth_token(ns),
            "server_hostname": tls.server_name if tls else None}


KV_IDLE_TIMEOUT_S = 30.0


def kv_receiver_options(ns: argparse.Namespace) -> dict:
    """TCPKVReceiver keyword arguments (decode): a server TLS context (client certificates
    required under mutual TLS) when TLS is configured, and the KV token."""
    tls = TlsConfig.for_server(ns)
    return {"ssl_context": tls.kv_server_context() if tls else None, "auth_token": kv_auth_token(ns),
            # A sender silent this long mid-transfer is dropped (its reservation then fails or expires).
            "idle_timeout_s": KV_IDLE_TIMEOUT_S}
