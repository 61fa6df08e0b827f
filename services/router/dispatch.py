"""One request's path through the cluster: reserve KV on a decode server, prefill on a prefill
server (which streams the KV there and returns the first token at once), then relay the decode
server's stream. Or, with colocated workers only, relay one worker's stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from models.sampling_params import SamplingParams
from protos.pdserve.v1 import (colocated_pb2, decode_pb2, prefill_pb2, router_pb2, worker_pb2)
from services.grpc_common.convert import engine_sampling_params_to_proto
from services.grpc_common.errors import UnavailableError
from services.router.responses import StreamState, responses_for
from services.router.worker_choice import InFlight, choose_decode, choose_prefill
from services.router.worker_clients import WorkerClients
from services.state.registry import WorkerRegistry
from services.state.request_store import RequestStore


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

    async def run(self, state: StreamState, prompt_ids: list[int],
                  params: SamplingParams) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Serve the request; responses are recorded in Redis as they are yielded."""
        prefill = await self.registry.list("prefill")
        decode = await self.registry.list("decode")
        if prefill and decode:
            stream = self._disaggregated(state, prompt_ids, params, prefill, decode)
        else:
            colocated = await self.registry.list("worker")
            if not colocated:
                raise UnavailableError("no workers registered: need prefill + decode servers or "
                                       "colocated workers")
            stream = self._colocated(state, prompt_ids, params, colocated)
        async for response in stream:
            if response.HasField("chunk") and response.chunk.token_ids:
                await self.store.append_tokens(state.request_id, response.chunk.index,
                                               list(response.chunk.token_ids))
            elif response.HasField("complete"):
                await self.store.finish(state.request_id, response.complete.index,
                                        response.complete.finish_reason)
            yield response

    async def _disaggregated(self, state, prompt_ids, params, prefill_workers, decode_workers):
        decode_worker = choose_decode(decode_workers, self.inflight)
        prefill_worker = choose_prefill(prefill_workers, self.inflight)
        n_prompt = len(prompt_ids)
        sampling = engine_sampling_params_to_proto(params)
        self.inflight.add(decode_worker.worker_id, 0)
        self.inflight.add(prefill_worker.worker_id, n_prompt)
        self.assigned[state.request_id] = [prefill_worker.address, decode_worker.address]
        prefill_done = False
        try:
            reservation = await self.clients.decode(decode_worker.address).Reserve(
                decode_pb2.ReserveRequest(request_id=state.request_id, prompt_tokens=n_prompt,
                                          max_tokens=params.max_tokens, n=params.n, lease_ms=self.lease_ms),
                timeout=self.rpc_timeout_s)
            target = prefill_pb2.KvTarget(kv_endpoint=reservation.kv_endpoint,
                                          reservation_id=reservation.reservation_id,
                                          block_ids=reservation.block_ids)
            first = (await self.clients.prefill(prefill_worker.address).Prefill(
                prefill_pb2.PrefillRequest(request_id=state.request_id, prompt_token_ids=prompt_ids,
                                           sampling=sampling, kv_target=target),
                timeout=self.rpc_timeout_s)).output
            prefill_done = True
            self.inflight.done(prefill_worker.worker_id, n_prompt)
            # Finished samples carry their text; the others' first-token text comes from decode.
            for response in responses_for(state, first, include_text=True):
                yield response
            if state.finished:
                return
            progress = [worker_pb2.SampleProgress(index=i, generated_token_ids=s.token_ids)
                        for i, s in enumerate(state.samples) if s.finish_reason is None]
            stream = self.clients.decode(decode_worker.address).Decode(decode_pb2.DecodeRequest(
                request_id=state.request_id, reservation_id=reservation.reservation_id,
                prompt_token_ids=prompt_ids, samples=progress, sampling=sampling,
                cached_tokens=first.cached_tokens))
            async for output in stream:
                for response in responses_for(state, output):
                    yield response
        finally:
            self.assigned.pop(state.request_id, None)
            if not prefill_done:
                self.inflight.done(prefill_worker.worker_id, n_prompt)
            self.inflight.done(decode_worker.worker_id, 0)
            if not state.finished:
                await asyncio.gather(self.clients.abort(decode_worker.address, state.request_id),
                                     self.clients.abort(prefill_worker.address, state.request_id))

    async def _colocated(self, state, prompt_ids, params, workers):
        worker = choose_decode(workers, self.inflight)
        self.inflight.add(worker.worker_id, len(prompt_ids))
        self.assigned[state.request_id] = [worker.address]
        try:
            stream = self.clients.colocated(worker.address).Generate(colocated_pb2.WorkerGenerateRequest(
                request_id=state.request_id, prompt_token_ids=prompt_ids,
                sampling=engine_sampling_params_to_proto(params)))
            async for output in stream:
                for response in responses_for(state, output):
                    yield response
        finally:
            self.assigned.pop(state.request_id, None)
            self.inflight.done(worker.worker_id, len(prompt_ids))
            if not state.finished:
                await self.clients.abort(worker.address, state.request_id)
