"""`pdserve serve router`: the router process."""

from __future__ import annotations

import argparse

import redis.asyncio as aioredis

from models.config import ModelConfig
from models.tokenizer import Tokenizer
from protos.pdserve.v1 import router_pb2, router_pb2_grpc
from services.grpc_common.health import service_names_of
from services.router.dispatch import Dispatcher
from services.router.servicer import RouterServicer
from services.router.worker_clients import WorkerClients
from services.server_runtime import logger, start_grpc_server, wait_for_shutdown_signal
from services.state.registry import WorkerRegistry
from services.state.request_store import RequestStore


async def serve_router(ns: argparse.Namespace) -> None:
    """Start the router and serve until SIGTERM/SIGINT."""
    tokenizer = Tokenizer.from_dir(ns.model)
    model_config = ModelConfig.from_dir(ns.model)
    redis = aioredis.from_url(ns.redis_url)
    await redis.ping()
    clients = WorkerClients()
    dispatcher = Dispatcher(WorkerRegistry(redis, prefix=ns.redis_prefix), RequestStore(redis, prefix=ns.redis_prefix),
                            clients, lease_ms=ns.lease_ms)
    max_model_len = min(ns.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    servicer = RouterServicer(tokenizer, model_config, ns.model_name or ns.model, dispatcher,
                              max_model_len, ns.block_size)
    server, port = await start_grpc_server(
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
        service_names_of(router_pb2), ns.host, ns.port)
    logger.info("router listening on %s:%d", ns.host, port)
    print(f"READY router {ns.host}:{port}", flush=True)
    try:
        await wait_for_shutdown_signal()
    finally:
        await server.stop(grace=5)
        await clients.close()
        await redis.aclose()
