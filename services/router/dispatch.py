"""A request's life on the router: attempts on the workers (attempt.py), retried elsewhere with
backoff when a worker fails, its progress recorded in Redis as responses go to the client.

A retry continues from what the client was sent (prompt + tokens as context, sampling at the
same output positions: seeded draws are a pure function of seed, sample and position), so the
stream goes on with no token lost or repeated. A request that cannot be served ends with a
clear status after a bounded number of attempts, never with wrong tokens."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from pdserve.models.sampling_params import SamplingParams
from pdserve.router.attempt import Attempt, AttemptRunner
from pdserve.router.failover import RetryPolicy, SuspectWorkers, is_worker_failure
from pdserve.router.progress import ProgressRecorder
from pdserve.router.responses import StreamState, completion
from pdserve.router.worker_choice import InFlight
from pdserve.router.worker_clients import WorkerClients
from pdserve.runtime.errors import OverloadedError, UnavailableError
from pdserve.settings import RoutingWeights
from pdserve.state.kv_events import PrefixIndex
from pdserve.state.registry import WorkerInfo, WorkerRegistry
from pdserve.state.request_store import RequestRecord, RequestStore
from pdserve.v1 import router_pb2

logger = logging.getLogger("pdserve.router")
PROBE_TIMEOUT_S = 0.5


def params_record(params: SamplingParams) -> dict:
    """The request's resolved sampling parameters as stored in its Redis record."""
    return dataclasses.asdict(params)


class Dispatcher:
    """Runs requests across the registered workers and yields the client's responses."""

    def __init__(self, registry: WorkerRegistry, store: RequestStore, clients: WorkerClients,
                 lease_ms: int = 30_000, rpc_timeout_s: float = 60.0, policy: RetryPolicy | None = None,
                 on_retry: Callable[[str], None] | None = None, prefix_index: PrefixIndex | None = None,
                 weights: RoutingWeights | None = None, on_route: Callable[[str, str], None] | None = None):
        """on_retry(reason) is called for every retry of a request elsewhere (e.g. to count them
        by reason: a gRPC status name, or the exception's class). prefix_index: choose prefill and
        decode servers by what their prefix caches hold (--routing kv), weighed against their load
        by `weights`, else by load alone. on_route(role, reason) is called for every choice."""
        self.registry = registry
        self.store = store
        self.clients = clients
        self.inflight = InFlight()
        self.policy = policy or RetryPolicy()
        self.suspects = SuspectWorkers()
        self.runner = AttemptRunner(registry, clients, self.inflight, self.suspects, lease_ms, rpc_timeout_s,
                                    self.policy.stream_idle_timeout_s, prefix_index, weights or RoutingWeights(),
                                    on_route)
        self.attempts: dict[str, Attempt] = {}  # request id -> its current attempt
        self.on_retry = on_retry

    async def abort(self, state: StreamState) -> None:
        """Abort the request wherever it runs; its stream then ends with "abort"."""
        state.abort_requested = True
        attempt = self.attempts.get(state.request_id)
        if attempt is not None:
            await asyncio.gather(*(self.clients.abort(w.address, attempt.worker_request_id)
                                   for w in attempt.workers))

    async def run(self, state: StreamState, prompt_ids: list[int], params: SamplingParams,
                  trace_carrier: dict[str, str] | None = None, resume_from: RequestRecord | None = None
                  ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Serve the request (or continue it from `state`); responses are recorded in Redis as
        they are yielded. trace_carrier: the W3C trace context of the router's span, passed to
        every worker (gRPC metadata and the requests' trace_context fields). resume_from: the
        Redis record as it stands when a resumed request continues."""
        recorder = ProgressRecorder(self.store, state.request_id, prompt_ids, params_record(params), params.seed,
                                    owner=state.owner, resume_from=resume_from)
        try:
            # aclosing, here and below: a client leaving closes every inner stream now, so the
            # cleanup that aborts the workers runs at once, not when the generators are collected.
            async with contextlib.aclosing(self._with_retries(state, prompt_ids, params, trace_carrier or {})) as rs:
                async for response in rs:
                    recorder.follow(state.samples)
                    yield response
        finally:
            self.attempts.pop(state.request_id, None)
            await recorder.close()

    async def _with_retries(self, state: StreamState, prompt_ids: list[int], params: SamplingParams,
                            carrier: dict[str, str]) -> AsyncIterator[router_pb2.GenerateResponse]:
        failures = 0  # consecutive attempts that failed without sending the client anything
        avoid: set[str] = set()  # workers that failed this request
        while True:
            # The first attempt of a new request keeps its id on the workers (traces, logs); a
            # retry or resume gets a fresh one, so an old attempt's abort never reaches it.
            fresh = failures == 0 and not avoid and not state.started
            attempt = Attempt(state.request_id if fresh else f"{state.request_id}~{uuid.uuid4().hex[:8]}",
                              avoid=set(avoid))
            self.attempts[state.request_id] = attempt
            sent_before = _progress(state)
            try:
                async with contextlib.aclosing(self.runner.run(state, attempt, prompt_ids, params, carrier)) as rs:
                    async for response in rs:
                        yield response
                return
            except Exception as exc:
                if state.finished:  # every completion went out: a failure after that changes nothing
                    return
                if state.abort_requested:  # the failure may be the abort itself (reservation gone)
                    break
                # Full workers refuse a new request at once (the client retries later), but a
                # stream already under way waits for room with the same bounded backoff.
                retryable = is_worker_failure(exc) or (state.started and isinstance(exc, OverloadedError))
                if not retryable:
                    raise
                failures = 1 if _progress(state) > sent_before else failures + 1
                avoid.update(w.worker_id for w in attempt.workers)
                await self._suspect_dead(attempt.workers)
                if failures >= self.policy.max_attempts:
                    raise UnavailableError(f"request {state.request_id} could not be served: {failures} attempts "
                                           f"failed in a row, the last with {_describe(exc)}") from exc
                if self.on_retry is not None:
                    self.on_retry(retry_reason(exc))
                delay = self.policy.delay_s(failures)
                logger.warning("request %s: attempt failed (%s); retrying in %.0f ms", state.request_id,
                               _describe(exc), delay * 1000)
                await asyncio.sleep(delay)
            if state.abort_requested:
                break
        for index, sample in enumerate(state.samples):  # aborted: nothing runs anywhere any more
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
                yield completion(state, index)

    async def _suspect_dead(self, workers: list[WorkerInfo]) -> None:
        """Probe the failed attempt's workers; those that do not answer become suspects, so
        every request avoids them until their registration expires."""
        unique = list({w.worker_id: w for w in workers}.values())
        alive = await asyncio.gather(*(self._answers(w) for w in unique))
        for worker, ok in zip(unique, alive):
            if not ok:
                self.suspects.mark(worker.worker_id)

    async def _answers(self, worker: WorkerInfo) -> bool:
        try:
            await self.clients.probe(worker.address, PROBE_TIMEOUT_S)
            return True
        except grpc.aio.AioRpcError:
            return False


def retry_reason(error: BaseException) -> str:
    """A retry's cause as a metrics label: the gRPC status name, else the exception's class."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    return type(error).__name__


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _progress(state: StreamState) -> int:
    """Tokens the client holds, over all samples."""
    return sum(len(sample.token_ids) for sample in state.samples)
