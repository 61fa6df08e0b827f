"""`python -m services.healthcheck HOST:PORT [SERVICE]`: exit 0 when the server's
grpc.health.v1 Check answers SERVING, 1 otherwise (NOT_SERVING while it drains, unreachable,
unknown service). For Docker healthchecks; Kubernetes probes gRPC health natively."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    """True when the server at address reports SERVING for `service` ("" = the whole server)."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when serving."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m services.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    return 0 if is_serving(args[0], args[1] if len(args) > 1 else "") else 1


if __name__ == "__main__":
    sys.exit(main())
