"""What the prefill, decode and colocated worker processes share: the engine on its thread,
WorkerControl (Abort, GetLoad, GetWorkerInfo), and the registry heartbeat carrying the load."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable

import grpc
import redis.asyncio as aioredis

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.setup import build_engine
from pdserve.runtime.lifecycle import Lifecycle, ShutdownSignals
from pdserve.runtime.server import drain_and_stop, logger, run_server, start_server_with_health
from pdserve.runtime.status import map_errors
from pdserve.settings import WorkerSettings
from pdserve.state.kv_events import KVEventPublisher, cancel_and_wait
from pdserve.state.redis_connect import check_redis, open_redis
from pdserve.state.registry import WorkerInfo, WorkerRegistry
from pdserve.telemetry.engine_collector import EngineStatsCollector
from pdserve.telemetry.metrics import WorkerMetrics
from pdserve.telemetry.process import ProcessTelemetry
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers.convert import stats_to_load_proto, stats_to_registry_load

ROLE_PROTO = {"prefill": worker_pb2.WORKER_ROLE_PREFILL, "decode": worker_pb2.WORKER_ROLE_DECODE,
              "colocated": worker_pb2.WORKER_ROLE_COLOCATED}


class WorkerContext:
    """One worker process's engine, identity and abort hooks."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.role = settings.role
        self.worker_id = settings.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.telemetry = ProcessTelemetry.start(settings.server.telemetry, self.role)
        self.metrics = WorkerMetrics(self.telemetry.registry)
        self.lifecycle = Lifecycle()
        if (settings.engine.tensor_parallel_size > 1 and self.role != "colocated"
                and settings.engine.kv_cache_dtype != "auto"):
            raise ValueError(f"--tensor-parallel-size > 1 with --kv-cache-dtype {settings.engine.kv_cache_dtype} on a "
                             f"{self.role} server: the KV transfer cannot yet map the heads of a quantized cache between "
                             "ranks (its blocks pack every head's values with their scales)")
        self.engine, self.tokenizer = build_engine(settings.engine)
        speculative = self.engine.config.speculative
        if speculative is not None:
            logger.info("speculative decoding: %s%s, %d tokens per step, in steps of at most %d running samples",
                        speculative.method, f" ({speculative.draft_model})" if speculative.draft_model else "",
                        speculative.num_speculative_tokens, speculative.max_batch_seqs)
        self.async_engine = AsyncEngine(self.engine)
        self.kv_endpoint = ""
        self.abort_hooks: list[Callable[[str], Awaitable[bool]]] = [self.async_engine.abort]
        self.close_hooks: list[Callable[[], None]] = []  # run at exit, after the engine stopped
        # A tensor-parallel runner's rank processes stop after every other hook: the KV transfer reads and
        # writes their caches until its own hook stopped it.
        self.close_runner: Callable[[], None] = getattr(self.engine.runner, "close", lambda: None)

    async def abort(self, request_id: str) -> bool:
        """Abort the request everywhere this worker holds it (engine, reservations, transfers)."""
        found = False
        for hook in self.abort_hooks:
            found = bool(await hook(request_id)) or found
        return found


class WorkerControlServicer(worker_pb2_grpc.WorkerControlServicer):
    """Abort, GetLoad and GetWorkerInfo for any worker role."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    @map_errors
    async def Abort(self, request, context):
        """Abort a request; found is False when the worker does not hold it."""
        return worker_pb2.WorkerAbortResponse(found=await self.ctx.abort(request.request_id))

    @map_errors
    async def GetLoad(self, request, context):
        """The engine's current accounting."""
        return stats_to_load_proto(self.ctx.async_engine.stats())

    @map_errors
    async def GetWorkerInfo(self, request, context):
        """Role, id and KV endpoint."""
        return worker_pb2.WorkerInfo(worker_id=self.ctx.worker_id, role=ROLE_PROTO[self.ctx.role],
                                     kv_endpoint=self.ctx.kv_endpoint)


async def heartbeat_forever(registry: WorkerRegistry, ctx: WorkerContext, address: str,
                            interval_s: float) -> None:
    """Write the worker's entry and load to Redis every interval (the TTL drops a dead worker)."""
    while True:
        info = WorkerInfo(ctx.worker_id, ctx.role, address, ctx.kv_endpoint,
                          stats_to_registry_load(ctx.async_engine.stats()))
        try:
            await registry.heartbeat(info)
        except (OSError, aioredis.RedisError) as exc:  # Redis away: keep serving, retry next beat
            logger.warning("heartbeat to Redis failed: %s", exc)
        await asyncio.sleep(interval_s)


def run_worker(settings: WorkerSettings) -> int:
    """Run a prefill, decode or colocated server (by the settings' role) until SIGTERM/SIGINT."""
    return run_server(lambda: _serve_role(settings))


async def _serve_role(settings: WorkerSettings) -> None:
    if settings.role == "prefill":
        from pdserve.workers import prefill as role_module
    elif settings.role == "decode":
        from pdserve.workers import decode as role_module
    else:
        from pdserve.workers import colocated as role_module
    ctx = WorkerContext(settings)
    register, names = await role_module.setup(ctx, settings)
    await serve_worker(settings, ctx, register, names)


async def serve_worker(settings: WorkerSettings, ctx: WorkerContext,
                       register: Callable[[grpc.aio.Server], None], service_names: list[str]) -> None:
    """Start the engine and the gRPC server, register in Redis, serve until SIGTERM/SIGINT;
    then NOT_SERVING, deregister, drain in-flight requests (up to drain_timeout_s) and stop."""
    server = settings.server
    redis = open_redis(settings.redis.url, settings.redis.ca_file)
    await check_redis(redis, settings.redis.url, require_reachable=False)  # wrong credentials: stop here
    signals = ShutdownSignals()

    def engine_failed(exc: BaseException) -> None:
        # A worker whose engine is gone (e.g. a tensor-parallel rank died) must leave, not keep heartbeating:
        # the router's failover carries its requests elsewhere, and a supervisor restarts it.
        logger.error("%s %s: the engine failed (%r); stopping", ctx.role, ctx.worker_id, exc)
        signals.requested.set()
        signals.forced.set()

    ctx.async_engine.on_failure = engine_failed
    ctx.async_engine.start()
    ctx.telemetry.registry.register(EngineStatsCollector(lambda: ctx.async_engine.stats()))
    control = WorkerControlServicer(ctx)

    def register_all(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerControlServicer_to_server(control, server)
        register(server)

    names = service_names + [worker_pb2.DESCRIPTOR.services_by_name["WorkerControl"].full_name]
    running = await start_server_with_health(register_all, names, server.host, server.port, tls=server.tls)
    address = f"{server.advertised_host()}:{running.port}"
    registry = WorkerRegistry(redis, prefix=settings.redis.prefix, ttl_s=3 * settings.heartbeat_s)
    beat = asyncio.create_task(heartbeat_forever(registry, ctx, address, settings.heartbeat_s))
    # What its prefix cache holds, for the router's --routing kv.
    publisher = KVEventPublisher(redis, settings.redis.prefix, ctx.worker_id, ctx.role, settings.engine.block_size,
                                 ctx.engine.pool, settings.heartbeat_s)
    publishing = asyncio.create_task(publisher.run())

    async def leave() -> None:  # no heartbeat may land after the delete
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        await cancel_and_wait(publishing)
        await registry.deregister(ctx.role, ctx.worker_id)

    ctx.telemetry.serve_metrics(server)
    logger.info("%s %s listening on %s", ctx.role, ctx.worker_id, address)
    print(f"READY {ctx.role} {address} {ctx.kv_endpoint}", flush=True)
    try:
        await signals.wait()
        await drain_and_stop(running, ctx.lifecycle, server.drain_timeout_s, signals, leave)
    finally:
        with contextlib.suppress(Exception):
            await leave()
        await running.server.stop(grace=0)
        ctx.async_engine.shutdown()
        for close in [*ctx.close_hooks, ctx.close_runner]:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(close)
        await redis.aclose()
        ctx.telemetry.close()
    if ctx.async_engine.failed:
        raise SystemExit(1)
