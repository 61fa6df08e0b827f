"""The decode server: reserves KV blocks for incoming prompts (a lease that expires if the KV
never arrives), receives KV into them over kvtransfer, and streams the rest of the generation
from its continuous batch."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from pdserve.kvtransfer import ReceivedTransfer, TCPKVReceiver
from pdserve.runtime.errors import InvalidRequestError, NotFoundError, UnavailableError
from pdserve.runtime.sampling_proto import sampling_params_from_engine_proto
from pdserve.runtime.status import map_errors
from pdserve.settings import DecodeSettings
from pdserve.telemetry import spans, tracing
from pdserve.telemetry.metrics import WorkerMetrics
from pdserve.v1 import decode_pb2, decode_pb2_grpc
from pdserve.workers.convert import request_output_to_proto
from pdserve.workers.keepalive import with_keepalive
from pdserve.workers.kv_transport import kv_receiver
from pdserve.workers.queue_bound import QueueBound
from pdserve.workers.request_checks import RequestIds, check_decode, check_reserve
from pdserve.workers.request_trace import WorkerRequestTrace
from pdserve.workers.runtime import WorkerContext

EXPIRY_SWEEP_S = 0.25
# The engine's own expiry is a safety net behind the server's: the server stops the receiver
# first and then frees the blocks, so no late KV is ever written into reused blocks.
ENGINE_EXPIRY_GRACE_S = 10.0


@dataclass
class KVLease:
    """The decode server's lease on the blocks reserved for one request's prompt KV: it ends at
    expires_at (lease_s, the router's lease_ms, after the Reserve), unless `arrived` resolves
    first, when the KV is in. While a prefill server's KV connection is attached (its prompt
    queued or computing there) the lease is renewed: a queue is not a failure, and a sender that
    dies closes its connection."""

    request_id: str
    expires_at: float
    arrived: asyncio.Future
    prompt_tokens: int = 0
    lease_s: float = 30.0


class DecodeServicer(decode_pb2_grpc.DecodeWorkerServicer):
    """pdserve.v1.DecodeWorker."""

    def __init__(self, ctx: WorkerContext, receiver: TCPKVReceiver, queue: QueueBound | None = None,
                 keepalive_s: float = 5.0):
        self.ctx = ctx
        self.keepalive_s = keepalive_s
        self.receiver = receiver
        self.reservations: dict[str, KVLease] = {}
        self.decoding = RequestIds()  # Decode calls in progress (a second one: ALREADY_EXISTS)
        self.queue = queue or QueueBound(what="decode queue")  # reservations + requests waiting for a slot

    @map_errors
    async def Reserve(self, request, context):
        """Hold blocks for the prompt and open them to the KV receiver until the lease ends."""
        self.ctx.lifecycle.check_accepting("Reserve")
        span = spans.start(spans.DECODE_RESERVE, tracing.parent_from(None, context), SpanKind.SERVER)
        try:
            with self.queue.hold(len(self.reservations) + self.ctx.async_engine.stats().num_waiting_requests):
                response = await self._reserve(request)
        except BaseException as exc:
            self.queue.add_hint(exc)  # KV blocks short (the engine's OverloadedError): our retry hint
            spans.end_with_error(span, exc)
            raise
        if span.is_recording():
            span.set_attributes({spans.GEN_AI_REQUEST_ID: request.request_id,
                                 spans.PDSERVE_RESERVATION_ID: response.reservation_id,
                                 spans.PDSERVE_KV_BLOCKS: len(response.block_ids)})
        span.end()
        return response

    async def _reserve(self, request) -> decode_pb2.ReserveResponse:
        check_reserve(request, self.ctx.engine)
        lease_s = (request.lease_ms or 30_000) / 1000
        reservation_id = f"{request.request_id}/{uuid.uuid4().hex[:12]}"
        expires_at = time.monotonic() + lease_s
        if request.prompt_token_ids:  # the prefix cache may hold the prompt's first blocks: not sent again
            block_ids, held_blocks = await self.ctx.async_engine.reserve_prompt(
                reservation_id, list(request.prompt_token_ids), expires_at + ENGINE_EXPIRY_GRACE_S)
        else:
            block_ids = await self.ctx.async_engine.reserve(reservation_id, request.prompt_tokens,
                                                            expires_at + ENGINE_EXPIRY_GRACE_S)
            held_blocks = 0
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()

        def on_complete(rid: str, error: Exception | None) -> None:  # a receiver thread
            loop.call_soon_threadsafe(_resolve, arrived, error)

        self.reservations[reservation_id] = KVLease(request.request_id, expires_at, arrived,
                                                    request.prompt_tokens, lease_s)
        self.receiver.expect(reservation_id, list(block_ids), request.prompt_tokens, on_complete, held_blocks)
        self.ctx.metrics.observe_reserved_blocks(len(block_ids) - held_blocks, held_blocks)
        return decode_pb2.ReserveResponse(
            reservation_id=reservation_id, kv_endpoint=self.ctx.kv_endpoint, block_ids=block_ids,
            held_blocks=held_blocks,
            block_size=self.ctx.engine.config.block_size, lease_ms=int(lease_s * 1000),
            lease_expires_unix_ms=int((time.time() + lease_s) * 1000))

    @map_errors
    async def Decode(self, request, context):
        """Wait for the reservation's KV, then join the batch and stream the outputs. While
        draining, a Decode of a reservation this server granted is still served."""
        if not request.reservation_id:
            self.ctx.lifecycle.check_accepting("Decode without a reservation")
        trace = WorkerRequestTrace(spans.DECODE, request.request_id, request.trace_context, context,
                                   self.ctx.metrics, "decode", self.ctx.worker_id, forward=False,
                                   count_finished=True)
        generated_tokens = 0
        error: BaseException | None = None
        try:
            # aclosing: a caller leaving early aborts the request here now, not at collection.
            with self.ctx.lifecycle.track():
                outputs = with_keepalive(self._decode(request, trace), request.request_id, self.keepalive_s)
                async with contextlib.aclosing(outputs) as outputs:
                    async for output in outputs:
                        generated_tokens += sum(len(s.token_ids) for s in output.samples)
                        yield output
        except BaseException as exc:
            error = exc
            raise
        finally:
            trace.end(error, {spans.GEN_AI_USAGE_COMPLETION_TOKENS: generated_tokens})

    async def _decode(self, request, trace: WorkerRequestTrace):
        reservation_id = request.reservation_id or None
        # Held from before the KV wait (no await in between): a second Decode of a request
        # already here is refused at once and leaves the first one's reservation alone.
        with self.decoding.hold(request.request_id):
            params = await self._checked(request, reservation_id)
            if reservation_id is not None:
                waited_from = spans.now_ns()
                await self._wait_for_kv(reservation_id)
                spans.record(spans.KV_WAIT, trace.span, waited_from, spans.now_ns(),
                             {spans.PDSERVE_RESERVATION_ID: reservation_id})
            generated = [list(s.generated_token_ids) for s in request.samples]
            indices = [s.index for s in request.samples]
            trace.submitted()
            stream = self.ctx.async_engine.generate_prefilled(
                request.request_id, list(request.prompt_token_ids), params, generated, indices,
                reservation_id, request.cached_tokens)
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    trace.on_output(output)
                    yield request_output_to_proto(output)

    async def _checked(self, request, reservation_id: str | None):
        """The request's params once it passes every check that needs no KV (so a malformed
        Decode fails now, not after the KV wait). A refused Decode releases the reservation it
        names, as the engine does: a Decode consumes its reservation whatever happens."""
        reservation = self.reservations.get(reservation_id) if reservation_id is not None else None
        if reservation_id is not None and reservation is None:
            raise NotFoundError(f"reservation {reservation_id!r} is not open (expired or unknown)")
        if reservation is not None and reservation.request_id != request.request_id:
            raise InvalidRequestError(f"reservation {reservation_id!r} belongs to request "
                                      f"{reservation.request_id!r}, not {request.request_id!r}")
        try:
            params = sampling_params_from_engine_proto(request.sampling)
            check_decode(request, params, self.ctx.engine,
                         reservation.prompt_tokens if reservation is not None else None)
        except Exception:
            if reservation_id is not None:
                await self._drop(reservation_id)
            raise
        return params

    async def _wait_for_kv(self, reservation_id: str) -> None:
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise NotFoundError(f"reservation {reservation_id!r} is not open (expired or unknown)")
        try:
            while True:  # until the KV is in, or the lease (renewed while a sender is attached) ends
                remaining = reservation.expires_at - time.monotonic()
                if remaining <= 0 and not self.receiver.has_sender(reservation_id):
                    raise TimeoutError(f"the lease ran out after {reservation.lease_s:g} s")
                done, _ = await asyncio.wait({reservation.arrived}, timeout=max(remaining, EXPIRY_SWEEP_S))
                if done:
                    reservation.arrived.result()
                    break
        except Exception as exc:  # timed out, or the transfer failed
            await self._drop(reservation_id)
            raise UnavailableError(f"KV for reservation {reservation_id!r} did not arrive: {exc}") from exc
        self.reservations.pop(reservation_id, None)

    async def _drop(self, reservation_id: str) -> bool:
        """Forget a reservation everywhere and free its blocks."""
        reservation = self.reservations.pop(reservation_id, None)
        self.receiver.cancel(reservation_id)
        released = await self.ctx.async_engine.release_reservation(reservation_id)
        if reservation is not None and not reservation.arrived.done():
            reservation.arrived.set_exception(TimeoutError("reservation released"))
            reservation.arrived.exception()  # retrieved: nobody may be waiting
        return released or reservation is not None

    async def abort_reservations(self, request_id: str) -> bool:
        """Abort hook: drop the request's open reservations."""
        ids = [rid for rid, r in self.reservations.items() if r.request_id == request_id]
        results = [await self._drop(rid) for rid in ids]
        return any(results)

    async def expire_forever(self) -> None:
        """Every EXPIRY_SWEEP_S: renew the leases whose KV sender is attached, and free the
        reservations whose lease ran out before their KV (or their Decode) came: the receiver
        forgets them first, then the engine frees their blocks."""
        while True:
            await asyncio.sleep(EXPIRY_SWEEP_S)
            await self.sweep(time.monotonic())

    async def sweep(self, now: float) -> None:
        """One pass of expire_forever at time `now` (time.monotonic())."""
        renewed = {}
        for rid, lease in list(self.reservations.items()):
            if lease.expires_at - now > lease.lease_s / 2:
                continue
            if not lease.arrived.done() and self.receiver.has_sender(rid):
                lease.expires_at = now + lease.lease_s
                renewed[rid] = lease.expires_at + ENGINE_EXPIRY_GRACE_S
            elif lease.expires_at <= now:
                await self._drop(rid)
        if renewed:
            await self.ctx.async_engine.extend_reservations(renewed)
        for rid in await self.ctx.async_engine.expire_reservations(now):
            self.receiver.cancel(rid)


def observe_received(metrics: WorkerMetrics, report: ReceivedTransfer) -> None:
    """A KV transfer into this server ended (a receiver thread): metrics (direction
    "received") and a kv.receive span under the sender's kv.transfer span, whose context came
    in the handshake."""
    metrics.observe_transfer("received", report.bytes, report.seconds, ok=report.error is None,
                             data_path=report.data_path)
    parent = tracing.extract(report.metadata)
    if parent is None:
        return
    span = spans.start(spans.KV_RECEIVE, parent, SpanKind.CONSUMER, report.started_unix_ns)
    span.set_attributes({spans.PDSERVE_RESERVATION_ID: report.reservation_id,
                         spans.PDSERVE_KV_BYTES: report.bytes, spans.PDSERVE_KV_BLOCKS: report.blocks,
                         spans.PDSERVE_KV_SECONDS: report.seconds, spans.PDSERVE_KV_DATA_PATH: report.data_path})
    spans.end_with_error(span, report.error)


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # mark retrieved; the waiter (if any) re-raises it


async def setup(ctx: WorkerContext, settings: DecodeSettings):
    """Start the KV receiver and the lease sweeper; return (register, service names)."""
    runner = ctx.engine.runner
    receiver = kv_receiver(settings, ctx.worker_id, runner.rank_kv_caches, runner.model.config.num_kv_heads,
                           lambda report: observe_received(ctx.metrics, report), ctx.telemetry.registry)
    receiver.start()
    host = settings.server.advertised_host()
    ctx.kv_endpoint = f"{host}:{receiver.endpoint.rsplit(':', 1)[1]}"
    servicer = DecodeServicer(ctx, receiver, settings.queue_bound("decode queue"), settings.stream_keepalive_s)
    ctx.abort_hooks.append(servicer.abort_reservations)
    ctx.close_hooks.append(receiver.stop)
    ctx.lifecycle.add_source(lambda: len(servicer.reservations))  # granted, Decode still to come
    sweeper = asyncio.create_task(servicer.expire_forever())
    servicer.sweeper = sweeper  # keep a reference: the task runs for the server's life
    names = [decode_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name]
    return (lambda server: decode_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)), names
