"""`pdserve serve router`: the router process."""

from __future__ import annotations

import asyncio

from pdserve.models.source import resolve_model
from pdserve.router.admission import AdmissionControl, AdmissionLimits
from pdserve.router.dispatch import Dispatcher
from pdserve.router.failover import RetryPolicy
from pdserve.router.servicer import RouterServicer
from pdserve.router.worker_clients import WorkerClients
from pdserve.runtime.channels import ClientSecurity
from pdserve.runtime.health import service_names_of
from pdserve.runtime.lifecycle import Lifecycle, ShutdownSignals
from pdserve.runtime.security import router_interceptors
from pdserve.runtime.server import drain_and_stop, logger, run_server, start_server_with_health
from pdserve.settings import RouterSettings
from pdserve.state.kv_events import PrefixIndex, cancel_and_wait
from pdserve.state.redis_connect import check_redis, open_redis, redact_url
from pdserve.state.redis_retry import RedisWait
from pdserve.state.registry import WorkerRegistry
from pdserve.state.request_store import RequestStore
from pdserve.telemetry.engine_collector import PrefixIndexCollector
from pdserve.telemetry.metrics import RouterMetrics
from pdserve.telemetry.process import ProcessTelemetry
from pdserve.v1 import router_pb2, router_pb2_grpc


def run_router(settings: RouterSettings) -> int:
    """Run the router until SIGTERM/SIGINT."""
    return run_server(lambda: serve_router(settings))


async def serve_router(settings: RouterSettings) -> None:
    """Start the router and serve until SIGTERM/SIGINT, then drain its streams and stop."""
    server, redis_settings = settings.server, settings.redis
    telemetry = ProcessTelemetry.start(server.telemetry, "router")
    signals = ShutdownSignals()
    source = resolve_model(settings.model)
    tokenizer, model_config, served_name = source.tokenizer(), source.model_config(), source.served_name
    del source  # a GGUF file's parsed metadata (tens of MiB for a large vocabulary) is not needed past here
    redis = open_redis(redis_settings.url, redis_settings.ca_file)
    await check_redis(redis, redis_settings.url)
    clients = WorkerClients(ClientSecurity(server.tls))  # its certificate is the client certificate
    redis_wait = RedisWait(redact_url(redis_settings.url), settings.redis_wait_s)  # Redis away: wait, then UNAVAILABLE
    metrics = RouterMetrics(telemetry.registry)
    prefix_index = PrefixIndex(redis, redis_settings.prefix) if settings.routing == "kv" else None
    following = None
    if prefix_index is not None:
        following = asyncio.create_task(prefix_index.run())
        telemetry.registry.register(PrefixIndexCollector(prefix_index.blocks_by_worker))
    dispatcher = Dispatcher(WorkerRegistry(redis, prefix=redis_settings.prefix, wait=redis_wait),
                            RequestStore(redis, prefix=redis_settings.prefix, wait=redis_wait),
                            clients, lease_ms=settings.lease_ms, rpc_timeout_s=settings.rpc_timeout_s,
                            policy=RetryPolicy(max_attempts=settings.max_attempts,
                                               stream_idle_timeout_s=settings.stream_idle_timeout_s),
                            on_retry=lambda reason: metrics.retries.labels(reason=reason).inc(),
                            prefix_index=prefix_index, weights=settings.routing_weights,
                            on_route=lambda role, reason: metrics.routing_decisions.labels(role, reason).inc())
    max_model_len = min(settings.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    lifecycle = Lifecycle()
    admission = AdmissionControl(AdmissionLimits(settings.max_inflight_requests, settings.overload_retry_after_ms))
    servicer = RouterServicer(tokenizer, model_config, settings.model_name or served_name, dispatcher,
                              max_model_len, settings.block_size, metrics, lifecycle,
                              admission)
    running = await start_server_with_health(
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s), service_names_of(router_pb2),
        server.host, server.port, tls=server.tls, interceptors=router_interceptors(settings.api_keys))
    telemetry.serve_metrics(server)
    logger.info("router listening on %s:%d", server.host, running.port)
    print(f"READY router {server.advertised_host()}:{running.port}", flush=True)
    try:
        await signals.wait()
        await drain_and_stop(running, lifecycle, server.drain_timeout_s, signals)
    finally:
        await running.server.stop(grace=0)
        await cancel_and_wait(following)
        await clients.close()
        await redis.aclose()
        telemetry.close()
