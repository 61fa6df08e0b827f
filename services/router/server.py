"""`pdserve serve router`: the router process."""

from __future__ import annotations

import argparse

import redis.asyncio as aioredis

from models.config import ModelConfig
from models.tokenizer import Tokenizer
from protos.pdserve.v1 import router_pb2, router_pb2_grpc
from services.grpc_common.health import service_names_of
from services.lifecycle import Lifecycle, ShutdownSignals
from services.router.dispatch import Dispatcher
from services.router.servicer import RouterServicer
from services.router.worker_clients import WorkerClients
from services.server_runtime import advertised_host, drain_and_stop, logger, start_server_with_health
from services.state.registry import WorkerRegistry
from services.state.request_store import RequestStore
from services.telemetry.metrics import RouterMetrics
from services.telemetry.process import ProcessTelemetry


async def serve_router(ns: argparse.Namespace) -> None:
    """Start the router and serve until SIGTERM/SIGINT, then drain its streams and stop."""
    telemetry = ProcessTelemetry.start(ns, "router")
    signals = ShutdownSignals()
    tokenizer = Tokenizer.from_dir(ns.model)
    model_config = ModelConfig.from_dir(ns.model)
    redis = aioredis.from_url(ns.redis_url)
    await redis.ping()
    clients = WorkerClients()
    dispatcher = Dispatcher(WorkerRegistry(redis, prefix=ns.redis_prefix), RequestStore(redis, prefix=ns.redis_prefix),
                            clients, lease_ms=ns.lease_ms)
    max_model_len = min(ns.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    lifecycle = Lifecycle()
    servicer = RouterServicer(tokenizer, model_config, ns.model_name or ns.model, dispatcher,
                              max_model_len, ns.block_size, RouterMetrics(telemetry.registry), lifecycle)
    running = await start_server_with_health(
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
        service_names_of(router_pb2), ns.host, ns.port)
    telemetry.serve_metrics(ns)
    logger.info("router listening on %s:%d", ns.host, running.port)
    print(f"READY router {advertised_host(ns)}:{running.port}", flush=True)
    try:
        await signals.wait()
        await drain_and_stop(running, lifecycle, ns.drain_timeout_s, signals)
    finally:
        await running.server.stop(grace=0)
        await clients.close()
        await redis.aclose()
        telemetry.close()
