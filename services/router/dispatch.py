"""One request's path through the cluster: reserve KV on a decode server, prefill on a prefill
server (which streams the KV there and returns the first token at once), then relay the decode
server's stream. Or, with colocated workers only, relay one worker's stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from models.sampling_params import SamplingParams
from protos.pdserve.v1 import (colocated_pb2, decode_pb2, prefill_pb2, router_pb2, worker_pb2)
from services.grpc_common.convert import engine_sampling_params_to_proto
from services.grpc_common.errors import UnavailableError
from services.lifecycle import is_draining_refusal
from services.router.progress import ProgressRecorder
from services.router.responses import StreamState, responses_for
from services.router.worker_choice import InFlight, choose_decode, choose_prefill
from services.router.worker_clients import WorkerClients
from services.state.registry import WorkerInfo, WorkerRegistry
from services.state.request_store import RequestStore
from services.telemetry import tracing


class Dispatcher:
    """Runs requests across the registered workers and yields the client's responses."""

    def __init__(self, registry: WorkerRegistry, store: RequestStore, clients: WorkerClients,
                 lease_ms: int = 30_000, rpc_timeout_s: float = 60.0):
        self.registry = registry
        self.store = store
        self.clients = clients
        self.inflight = InFlight()
        self.lease_ms = lease_ms
        self.rpc_timeout_s = rpc_timeout_s
        self.assigned: dict[str, list[str]] = {}  # request id -> addresses of its workers

    async def abort(self, state: StreamState) -> None:
        """Abort the request on every worker it was sent to; its stream then ends with "abort"."""
        addresses = self.assigned.get(state.request_id, [])
        await asyncio.gather(*(self.clients.abort(a, state.request_id) for a in addresses))

    async def run(self, state: StreamState, prompt_ids: list[int], params: SamplingParams,
                  trace_carrier: dict[str, str] | None = None) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Serve the request; responses are recorded in Redis as they are yielded.
        trace_carrier: the W3C trace context of the router's span, passed to every worker
        (gRPC metadata and the requests' trace_context fields)."""
        carrier = trace_carrier or {}
        prefill = await self.registry.list("prefill")
        decode = await self.registry.list("decode")
        if prefill and decode:
            stream = self._disaggregated(state, prompt_ids, params, prefill, decode, carrier)
        else:
            colocated = await self.registry.list("worker")
            if not colocated:
                raise UnavailableError("no workers registered: need prefill + decode servers or "
                                       "colocated workers")
            stream = self._colocated(state, prompt_ids, params, colocated, carrier)
        recorder = ProgressRecorder(self.store, state.request_id)
        try:
            async for response in stream:
                recorder.record(response)
                yield response
        finally:
            await recorder.close()

    async def _on_first_available(self, workers: list[WorkerInfo], choose, prompt_tokens: int,
                                  call: Callable[[WorkerInfo], Awaitable]) -> tuple[WorkerInfo, object]:
        """await call(worker) on the worker `choose` picks, counting it in flight there; a worker
        that refuses because it is shutting down (draining) is left out and the next pick tried.
        Returns (worker, result); on success the in-flight count stays (the caller ends it)."""
        refused: set[str] = set()
        while True:
            worker = choose([w for w in workers if w.worker_id not in refused], self.inflight)
            self.inflight.add(worker.worker_id, prompt_tokens)
            try:
                return worker, await call(worker)
            except BaseException as exc:
                self.inflight.done(worker.worker_id, prompt_tokens)
                if not is_draining_refusal(exc):
                    raise
                refused.add(worker.worker_id)
                if len(refused) == len(workers):
                    raise UnavailableError(f"every {worker.role} server is shutting down") from exc

    async def _disaggregated(self, state, prompt_ids, params, prefill_workers, decode_workers, carrier):
        n_prompt = len(prompt_ids)
        sampling = engine_sampling_params_to_proto(params)
        metadata = tracing.grpc_metadata(carrier)
        assigned: list[str] = []
        self.assigned[state.request_id] = assigned
        decode_worker = None

        def reserve(worker: WorkerInfo):
            assigned.append(worker.address)
            return self.clients.decode(worker.address).Reserve(decode_pb2.ReserveRequest(
                request_id=state.request_id, prompt_tokens=n_prompt, max_tokens=params.max_tokens,
                n=params.n, lease_ms=self.lease_ms), timeout=self.rpc_timeout_s, metadata=metadata)

        try:
            decode_worker, reservation = await self._on_first_available(decode_workers, choose_decode, 0, reserve)
            target = prefill_pb2.KvTarget(kv_endpoint=reservation.kv_endpoint,
                                          reservation_id=reservation.reservation_id,
                                          block_ids=reservation.block_ids)
            prefill_request = prefill_pb2.PrefillRequest(
                request_id=state.request_id, prompt_token_ids=prompt_ids, sampling=sampling,
                kv_target=target, trace_context=carrier)

            def prefill(worker: WorkerInfo):
                assigned.append(worker.address)
                return self.clients.prefill(worker.address).Prefill(
                    prefill_request, timeout=self.rpc_timeout_s, metadata=metadata)

            prefill_worker, response = await self._on_first_available(
                prefill_workers, choose_prefill, n_prompt, prefill)
            self.inflight.done(prefill_worker.worker_id, n_prompt)
            first = response.output
            # Finished samples carry their text; the others' first-token text comes from decode.
            for response in responses_for(state, first, include_text=True):
                yield response
            if state.finished:  # done at the first token: nobody will send Decode, free the lease now
                await self.clients.abort(decode_worker.address, state.request_id)
                return
            progress = [worker_pb2.SampleProgress(index=i, generated_token_ids=s.token_ids)
                        for i, s in enumerate(state.samples) if s.finish_reason is None]
            stream = self.clients.decode(decode_worker.address).Decode(decode_pb2.DecodeRequest(
                request_id=state.request_id, reservation_id=reservation.reservation_id,
                prompt_token_ids=prompt_ids, samples=progress, sampling=sampling,
                cached_tokens=first.cached_tokens, trace_context=carrier), metadata=metadata)
            async for output in stream:
                for response in responses_for(state, output):
                    yield response
        finally:
            self.assigned.pop(state.request_id, None)
            if decode_worker is not None:
                self.inflight.done(decode_worker.worker_id, 0)
            if not state.finished:
                await asyncio.gather(*(self.clients.abort(a, state.request_id) for a in set(assigned)))

    async def _colocated(self, state, prompt_ids, params, workers, carrier):
        metadata = tracing.grpc_metadata(carrier)
        request = colocated_pb2.WorkerGenerateRequest(
            request_id=state.request_id, prompt_token_ids=prompt_ids,
            sampling=engine_sampling_params_to_proto(params), trace_context=carrier)
        assigned: list[str] = []
        self.assigned[state.request_id] = assigned

        async def open_stream(worker: WorkerInfo):
            assigned.append(worker.address)
            stream = self.clients.colocated(worker.address).Generate(request, metadata=metadata)
            return stream, await stream.read()  # a draining worker's refusal comes with the first read

        worker = None
        try:
            worker, (stream, output) = await self._on_first_available(
                workers, choose_decode, len(prompt_ids), open_stream)
            while output is not grpc.aio.EOF:
                for response in responses_for(state, output):
                    yield response
                output = await stream.read()
        finally:
            self.assigned.pop(state.request_id, None)
            if worker is not None:
                self.inflight.done(worker.worker_id, len(prompt_ids))
            if not state.finished:
                await asyncio.gather(*(self.clients.abort(a, state.request_id) for a in set(assigned)))
