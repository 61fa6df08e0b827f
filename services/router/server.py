"""`pdserve serve router`: the router process."""

from __future__ import annotations

import argparse

from pdserve.models.config import ModelConfig
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.admission import AdmissionControl, AdmissionLimits
from pdserve.router.dispatch import Dispatcher
from pdserve.router.failover import RetryPolicy
from pdserve.router.servicer import RouterServicer
from pdserve.router.worker_clients import WorkerClients
from pdserve.runtime.channels import ClientSecurity
from pdserve.runtime.health import service_names_of
from pdserve.runtime.lifecycle import Lifecycle, ShutdownSignals
from pdserve.runtime.security import router_interceptors
from pdserve.runtime.server import advertised_host, drain_and_stop, logger, start_server_with_health
from pdserve.runtime.tls import TlsConfig
from pdserve.state.redis_connect import check_redis, open_redis, redact_url
from pdserve.state.redis_retry import RedisWait
from pdserve.state.registry import WorkerRegistry
from pdserve.state.request_store import RequestStore
from pdserve.telemetry.metrics import RouterMetrics
from pdserve.telemetry.process import ProcessTelemetry
from pdserve.v1 import router_pb2, router_pb2_grpc


async def serve_router(ns: argparse.Namespace) -> None:
    """Start the router and serve until SIGTERM/SIGINT, then drain its streams and stop."""
    telemetry = ProcessTelemetry.start(ns, "router")
    signals = ShutdownSignals()
    tokenizer = Tokenizer.from_dir(ns.model)
    model_config = ModelConfig.from_dir(ns.model)
    tls = TlsConfig.for_server(ns)
    redis = open_redis(ns.redis_url, ns.redis_ca)
    await check_redis(redis, ns.redis_url)
    clients = WorkerClients(ClientSecurity(tls))  # its certificate is the client certificate
    redis_wait = RedisWait(redact_url(ns.redis_url), ns.redis_wait_s)  # Redis away: wait, then UNAVAILABLE
    dispatcher = Dispatcher(WorkerRegistry(redis, prefix=ns.redis_prefix, wait=redis_wait),
                            RequestStore(redis, prefix=ns.redis_prefix, wait=redis_wait),
                            clients, lease_ms=ns.lease_ms,
                            policy=RetryPolicy(max_attempts=ns.max_attempts,
                                               stream_idle_timeout_s=ns.stream_idle_timeout_s))
    max_model_len = min(ns.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    lifecycle = Lifecycle()
    servicer = RouterServicer(tokenizer, model_config, ns.model_name or ns.model, dispatcher,
                              max_model_len, ns.block_size, RouterMetrics(telemetry.registry), lifecycle,
                              AdmissionControl(AdmissionLimits(ns.max_inflight_requests, ns.overload_retry_after_ms)))
    running = await start_server_with_health(
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
        service_names_of(router_pb2), ns.host, ns.port, tls=tls, interceptors=router_interceptors(ns))
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
