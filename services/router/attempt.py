"""One attempt at serving a request on the registered workers: reserve KV on a decode server,
prefill on a prefill server (which streams the KV there and returns the first token at once),
then relay the decode server's stream. A request that already has tokens (a retry after a
worker failed, a resume) continues on a decode server instead, which recomputes prompt + tokens.
With colocated workers only, one worker does either."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from pdserve.models.sampling_params import SamplingParams
from pdserve.router.failover import SuspectWorkers, WorkerFailedError
from pdserve.router.responses import StreamState, responses_for
from pdserve.router.worker_choice import CacheAwareChoice, InFlight, choose_decode, choose_prefill
from pdserve.router.worker_clients import WorkerClients
from pdserve.runtime.errors import OverloadedError, UnavailableError
from pdserve.runtime.lifecycle import is_draining_refusal
from pdserve.runtime.retry_hint import retry_after_ms_of
from pdserve.runtime.sampling_proto import engine_sampling_params_to_proto
from pdserve.settings import RoutingWeights
from pdserve.state.kv_events import PrefixIndex
from pdserve.state.registry import WorkerInfo, WorkerRegistry
from pdserve.telemetry import tracing
from pdserve.v1 import colocated_pb2, decode_pb2, prefill_pb2, router_pb2, worker_pb2

WAITING_CALL_PROBE_TIMEOUT_S = 10.0  # a busy but live worker answers GetLoad well within this

@dataclass
class Attempt:
    """One try: the id the workers know the request by (unique per attempt, so aborting an old
    attempt never touches a newer one), and the workers it reached, as (worker, address)."""

    worker_request_id: str
    avoid: set[str] = field(default_factory=set)  # worker ids that failed this request before
    workers: list[WorkerInfo] = field(default_factory=list)


@dataclass
class AttemptRunner:
    """Runs attempts against the registry's workers, counting them in flight for load-aware choice."""

    registry: WorkerRegistry
    clients: WorkerClients
    inflight: InFlight
    suspects: SuspectWorkers
    lease_ms: int
    rpc_timeout_s: float
    stream_idle_timeout_s: float
    prefix_index: PrefixIndex | None = None  # --routing kv: workers chosen by what their caches hold
    weights: RoutingWeights = field(default_factory=RoutingWeights)
    on_route: Callable[[str, str], None] | None = None  # (role, reason) of every routing decision

    async def run(self, state: StreamState, attempt: Attempt, prompt_ids: list[int], params: SamplingParams,
                  carrier: dict[str, str]) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Serve (or continue) the request once; raises on any failure, leaving `state` at what
        the client was sent. The attempt's workers are aborted unless the request finished."""
        try:
            prefill, decode = await self._workers("prefill", attempt), await self._workers("decode", attempt)
            if decode and state.started:
                stream = self._continue(state, attempt, prompt_ids, params, decode, carrier)
            elif prefill and decode:
                stream = self._disaggregated(state, attempt, prompt_ids, params, prefill, decode, carrier)
            else:
                colocated = await self._workers("colocated", attempt)
                if not colocated:
                    raise UnavailableError("no workers registered: need prefill + decode servers or "
                                           "colocated workers")
                stream = self._colocated(state, attempt, prompt_ids, params, colocated, carrier)
            async with contextlib.aclosing(stream) as responses:
                async for response in responses:
                    yield response
        finally:
            if not state.finished:
                await self.clients.abort_all([(w.address, attempt.worker_request_id)
                                              for w in {w.worker_id: w for w in attempt.workers}.values()])

    async def _workers(self, role: str, attempt: Attempt) -> list[WorkerInfo]:
        """Registered workers of `role`, best first: those neither suspect nor failed by this
        request; else those not suspect (once every live worker has failed this request, try them
        again rather than a dead one, which stays registered until its heartbeat key expires);
        else those this request has not tried; else all."""
        workers = await self.registry.list(role)
        healthy = [w for w in workers if not self.suspects.is_suspect(w.worker_id)]
        fresh = [w for w in workers if w.worker_id not in attempt.avoid]
        return [w for w in healthy if w.worker_id not in attempt.avoid] or healthy or fresh or workers

    @staticmethod
    def _check_not_aborted(state: StreamState) -> None:
        if state.abort_requested:
            raise WorkerFailedError("aborted by the client")  # the retry loop ends the stream with "abort"

    async def _on_first_available(self, attempt: Attempt, workers: list[WorkerInfo], choose,
                                  prompt_tokens: int | Callable[[], int],
                                  call: Callable[[WorkerInfo], Awaitable]) -> tuple[WorkerInfo, object, int]:
        """await call(worker) on the worker `choose` picks, counting it in flight there. A worker
        that refuses (shutting down, or RESOURCE_EXHAUSTED) is left out and the next pick tried;
        when all refuse: OverloadedError if one was full, else UnavailableError. prompt_tokens: what
        the request adds to the chosen worker's in-flight prompt tokens (a callable: read after the
        choice). Returns (worker, result, those tokens); on success the in-flight count stays (the
        caller ends it with them)."""
        refused: set[str] = set()
        full = None
        while True:
            worker = choose([w for w in workers if w.worker_id not in refused], self.inflight)
            counted = prompt_tokens() if callable(prompt_tokens) else prompt_tokens  # after the choice
            self.inflight.add(worker.worker_id, counted)
            attempt.workers.append(worker)
            try:
                return worker, await call(worker), counted
            except BaseException as exc:
                self.inflight.done(worker.worker_id, counted)
                overloaded = (isinstance(exc, grpc.aio.AioRpcError)
                              and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
                if not (overloaded or is_draining_refusal(exc)):
                    raise
                full = exc if overloaded else full
                refused.add(worker.worker_id)
                if len(refused) == len(workers):
                    if full is not None:
                        raise OverloadedError(f"every {worker.role} server is full: {full.details()}",
                                              retry_after_ms=retry_after_ms_of(full)) from exc
                    raise UnavailableError(f"every {worker.role} server is shutting down") from exc

    async def _while_alive(self, call, worker: WorkerInfo):
        """Await a unary call that may queue on the worker for long: every rpc_timeout_s it is
        still pending, probe the worker; WorkerFailedError (the call cancelled) when the worker
        does not answer the probe within WAITING_CALL_PROBE_TIMEOUT_S (at most rpc_timeout_s).
        Retries come on evidence of failure, never on a queue's length."""
        pending = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self.rpc_timeout_s)
                if done:
                    return pending.result()
                try:
                    await self.clients.probe(worker.address, min(WAITING_CALL_PROBE_TIMEOUT_S, self.rpc_timeout_s))
                except grpc.aio.AioRpcError as error:
                    raise WorkerFailedError(f"{worker.role} server {worker.worker_id} stopped answering while "
                                            f"the call waited ({error.code().name})") from error
        finally:
            pending.cancel()  # no-op once done; else the gRPC call is cancelled

    async def _read(self, stream):
        """The stream's next output (or EOF); WorkerFailedError, the call cancelled, when the
        worker sends nothing for stream_idle_timeout_s (a hung or partitioned peer; a live worker
        sends keepalives while the request waits for a slot, see pdserve.workers.keepalive)."""
        try:
            return await asyncio.wait_for(stream.read(), self.stream_idle_timeout_s)
        except TimeoutError:
            stream.cancel()
            raise WorkerFailedError(f"the worker sent nothing for {self.stream_idle_timeout_s:g} s") from None

    async def _relay(self, state: StreamState, stream, first=None) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Relay a worker's output stream (after `first`, an output already read) until every
        sample finished; a stall, an early end or an abort the router did not ask for raises
        WorkerFailedError (the request then goes on elsewhere)."""
        output = first
        while True:
            if output is None:
                output = await self._read(stream)
            if output is grpc.aio.EOF:
                if state.finished:
                    return
                raise WorkerFailedError("the worker ended the stream before the request finished")
            if not state.abort_requested and any(s.finish_reason == "abort" for s in output.samples):
                raise WorkerFailedError("the worker aborted the request on its own (shutting down?)")
            for response in responses_for(state, output):
                yield response
            if state.finished:  # every completion is out: the stream's end changes nothing
                stream.cancel()
                return
            output = None

    async def _disaggregated(self, state, attempt, prompt_ids, params, prefill_workers, decode_workers, carrier):
        n_prompt = len(prompt_ids)
        sampling = engine_sampling_params_to_proto(params)
        metadata = tracing.grpc_metadata(carrier)
        rid = attempt.worker_request_id

        def reserve(worker: WorkerInfo):
            # The prompt's ids let the decode server keep what its prefix cache holds of it (not sent again).
            return self.clients.decode(worker.address).Reserve(decode_pb2.ReserveRequest(
                request_id=rid, prompt_tokens=n_prompt, max_tokens=params.max_tokens,
                n=params.n, lease_ms=self.lease_ms, prompt_token_ids=prompt_ids),
                timeout=self.rpc_timeout_s, metadata=metadata)

        by_cache = (CacheAwareChoice(self.prefix_index, prompt_ids, self.weights)
                    if self.prefix_index is not None else None)
        self._check_not_aborted(state)
        decode_worker, reservation, _ = await self._on_first_available(
            attempt, decode_workers, by_cache.decode if by_cache else choose_decode, 0, reserve)
        self._note_route(state, "decode", decode_worker, by_cache,
                         reservation.held_blocks * reservation.block_size)
        try:
            self._check_not_aborted(state)
            target = prefill_pb2.KvTarget(kv_endpoint=reservation.kv_endpoint,
                                          reservation_id=reservation.reservation_id,
                                          block_ids=reservation.block_ids, held_blocks=reservation.held_blocks)
            prefill_request = prefill_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=prompt_ids, sampling=sampling,
                kv_target=target, trace_context=carrier)

            def prefill(worker: WorkerInfo):
                # No deadline: the prompt may wait in a long prefill queue, which is not a failure.
                call = self.clients.prefill(worker.address).Prefill(prefill_request, metadata=metadata)
                return self._while_alive(call, worker)

            # With kv routing a prefill server's queue grows by what it is expected to compute, not the whole prompt.
            prefill_worker, response, counted = await self._on_first_available(
                attempt, prefill_workers, by_cache.prefill if by_cache else choose_prefill,
                (lambda: by_cache.tokens_to_compute) if by_cache else n_prompt, prefill)
            self.inflight.done(prefill_worker.worker_id, counted)
            self._note_route(state, "prefill", prefill_worker, by_cache, response.output.cached_tokens)
            self._check_not_aborted(state)
            responses = responses_for(state, response.output)
            if state.finished:  # done at the first token: nobody will send Decode, free the lease now
                try:
                    for response in responses:
                        yield response
                finally:  # also when the client leaves during the yield
                    await self.clients.abort_all([(decode_worker.address, rid)])
                return
            for response in responses:
                yield response
            stream = self.clients.decode(decode_worker.address).Decode(decode_pb2.DecodeRequest(
                request_id=rid, reservation_id=reservation.reservation_id, prompt_token_ids=prompt_ids,
                samples=_progress_of(state), sampling=sampling, cached_tokens=state.cached_tokens,
                trace_context=carrier), metadata=metadata)
            async with contextlib.aclosing(self._relay(state, stream)) as responses:
                async for response in responses:
                    yield response
        finally:
            self.inflight.done(decode_worker.worker_id, 0)

    def _note_route(self, state: StreamState, role: str, worker: WorkerInfo, by_cache: CacheAwareChoice | None,
                    cached_tokens: int) -> None:
        """Count the routing decision (by reason) and note it for the request's span: the chosen
        worker, the prompt tokens the index expected it to hold, and those it did hold
        (prefill: prefix-cache hits; decode: blocks kept from its cache, not transferred)."""
        reason = by_cache.reason if by_cache is not None else "load"
        if self.on_route is not None:
            self.on_route(role, reason)
        state.route.update({f"pdserve.route.{role}.worker": worker.worker_id, f"pdserve.route.{role}.reason": reason,
                            f"pdserve.route.{role}.expected_cached_tokens":
                                by_cache.expected_cached_tokens if by_cache is not None else 0,
                            f"pdserve.route.{role}.cached_tokens": int(cached_tokens)})

    def _continue(self, state, attempt, prompt_ids, params, decode_workers, carrier):
        """Continue a started request on a decode server: no reservation, it recomputes the
        prompt and the tokens sent so far (like a preempted request) and goes on."""
        metadata = tracing.grpc_metadata(carrier)
        request = decode_pb2.DecodeRequest(
            request_id=attempt.worker_request_id, prompt_token_ids=prompt_ids, samples=_progress_of(state),
            sampling=engine_sampling_params_to_proto(params), trace_context=carrier)
        return self._open_and_relay(state, attempt, decode_workers, prompt_ids, "decode",
                                    lambda w: self.clients.decode(w.address).Decode(request, metadata=metadata))

    def _colocated(self, state, attempt, prompt_ids, params, workers, carrier):
        """Serve (or continue) the request on a colocated worker."""
        metadata = tracing.grpc_metadata(carrier)
        request = colocated_pb2.WorkerGenerateRequest(
            request_id=attempt.worker_request_id, prompt_token_ids=prompt_ids,
            sampling=engine_sampling_params_to_proto(params), trace_context=carrier,
            samples=_progress_of(state) if state.started else [])
        return self._open_and_relay(state, attempt, workers, prompt_ids, "colocated",
                                    lambda w: self.clients.colocated(w.address).Generate(request, metadata=metadata))

    async def _open_and_relay(self, state, attempt, workers, prompt_ids, role, open_call):
        """Open a worker stream on the first worker (of `role`) that takes it and relay it."""
        self._check_not_aborted(state)
        by_cache = (CacheAwareChoice(self.prefix_index, prompt_ids, self.weights)
                    if self.prefix_index is not None else None)
        choose = getattr(by_cache, role) if by_cache is not None else choose_decode

        async def open_stream(worker: WorkerInfo):
            stream = open_call(worker)
            # A refusal (draining, full) comes with the first read; so does a recompute's end.
            return stream, await self._read(stream)

        worker, (stream, first), prompt_tokens = await self._on_first_available(
            attempt, workers, choose, (lambda: by_cache.tokens_to_compute) if by_cache else len(prompt_ids), open_stream)
        try:
            async with contextlib.aclosing(self._relay(state, stream, first)) as responses:
                async for response in responses:
                    yield response
        finally:
            self.inflight.done(worker.worker_id, prompt_tokens)
            self._note_route(state, role, worker, by_cache, state.cached_tokens)


def _progress_of(state: StreamState) -> list[worker_pb2.SampleProgress]:
    """The unfinished samples' tokens, for a worker that continues them; each will restate
    its text from the first character, which the relay then skips."""
    progress = []
    for index, sample in enumerate(state.samples):
        if sample.finish_reason is None:
            sample.expect_restated_text()
            progress.append(worker_pb2.SampleProgress(index=index, generated_token_ids=sample.token_ids))
    return progress
