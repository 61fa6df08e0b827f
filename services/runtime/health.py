"""Standard grpc.health.v1 health checking and server reflection for every pdserve server."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE_NAME = health.SERVICE_NAME  # "grpc.health.v1.Health"


def service_names_of(*pb2_modules: ModuleType) -> list[str]:
    """Full names of every service the given *_pb2 modules define, e.g.
    service_names_of(router_pb2) == ["pdserve.v1.Router"]."""
    return [service.full_name for module in pb2_modules
            for service in module.DESCRIPTOR.services_by_name.values()]


async def add_health_and_reflection(server: grpc.aio.Server,
                                    service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Register grpc.health.v1.Health and server reflection on `server` (before it starts).

    Health reports SERVING for the overall server ("") and for each of `service_names` (full
    names such as "pdserve.v1.Router"); other names get NOT_FOUND from Check. Reflection
    lists `service_names`, the health service and itself. Returns the health servicer: call
    `await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)` to change a status
    and `await servicer.enter_graceful_shutdown()` before stopping the server.
    """
    names = list(service_names)
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"service names must be non-empty strings, got {names!r}")
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    return servicer
