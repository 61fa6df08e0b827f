"""`python -m pdserve.cli.healthcheck HOST:PORT [SERVICE]`: exit 0 when the server's
grpc.health.v1 Check answers SERVING, 1 otherwise (NOT_SERVING while it drains, unreachable,
unknown service). For Docker healthchecks; Kubernetes probes gRPC health natively.

A server with TLS / mutual TLS is dialled with the --tls-* flags or, inside its container,
the same PDSERVE_TLS_* variables it runs with (its certificate must then name the host
dialled, e.g. 127.0.0.1, or set PDSERVE_TLS_SERVER_NAME). Health needs no API key."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cli.flags import add_tls_flags, client_security_from
from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.runtime.tls import TlsConfigError


def is_serving(address: str, service: str = "", timeout_s: float = 3.0,
               security: ClientSecurity = PLAINTEXT) -> bool:
    """True when the server at address reports SERVING for `service` ("" = the whole server)."""
    with security.channel(address, CHANNEL_OPTIONS) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when serving, 1 when not, 2 on a usage or TLS configuration error."""
    parser = argparse.ArgumentParser(prog="python -m pdserve.cli.healthcheck")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("service", nargs="?", default="", metavar="SERVICE")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    add_tls_flags(parser)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        security = client_security_from(ns, api_key_flag=None)
    except TlsConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    return 0 if is_serving(ns.address, ns.service, ns.timeout_s, security) else 1


if __name__ == "__main__":
    sys.exit(main())
