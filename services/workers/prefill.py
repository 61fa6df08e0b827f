"""The prefill server: batches prompts in its engine, streams each layer's KV to the decode
server's reserved blocks while the next layer computes, and returns the first token at once."""

from __future__ import annotations

import asyncio
import logging

from opentelemetry.trace import SpanKind

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.chunk_info import ChunkInfo
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.prefilled import first_token_params, outcome_after
from pdserve.kvtransfer import TCPKVSender
from pdserve.kvtransfer.backend import KVTransfer, TransferStats
from pdserve.runtime.errors import UnavailableError
from pdserve.runtime.sampling_proto import sampling_params_from_engine_proto
from pdserve.runtime.status import map_errors
from pdserve.settings import KV_CONNECT_TIMEOUT_S, PrefillSettings
from pdserve.telemetry import spans, tracing
from pdserve.v1 import prefill_pb2, prefill_pb2_grpc
from pdserve.workers.convert import request_output_to_proto
from pdserve.workers.kv_transport import kv_sender
from pdserve.workers.queue_bound import QueueBound
from pdserve.workers.request_checks import RequestIds, check_prefill, transfer_error
from pdserve.workers.request_trace import WorkerRequestTrace
from pdserve.workers.runtime import WorkerContext

logger = logging.getLogger("pdserve.prefill")
TRANSFER_TIMEOUT_S = 60.0


class LayerStreamer:
    """The engine's layer hook: after layer i of a step, queue that layer's blocks of every
    chunk whose request has an open transfer (runs on the engine thread).

    Over TCP each layer's blocks are snapshotted (the engine frees a prompt's blocks at its first
    token, before they are all sent). Over NIXL the decode server READs them in place, so a
    request's blocks are pinned in the block pool (one more reference) from the step that computes
    them until `release` (after the transfer ended), which runs between steps too."""

    def __init__(self, rank_kv_caches, pool: BlockPool):
        self.rank_kv_caches = rank_kv_caches  # per tensor-parallel rank, per layer (K, V)
        self.pool = pool
        self.transfers: dict[str, KVTransfer] = {}
        self.pins: dict[str, dict[int, None]] = {}  # request id -> its pinned block ids (engine thread only)
        self.num_pinned = 0

    def __call__(self, layer: int, infos: list[ChunkInfo]) -> None:
        caches = [rank[layer] for rank in self.rank_kv_caches]
        for info in infos:
            transfer = self.transfers.get(info.request_id)
            if transfer is None or info.start >= info.num_prompt_tokens:
                continue
            in_place = transfer.data_path == "nixl"
            try:
                if in_place and layer == 0:
                    self._pin(info.request_id, info.cached_block_ids + info.block_ids)
                if info.cached_block_ids:  # prefix-cache hit: those blocks' KV was computed earlier
                    transfer.send_layer_ranks(layer, caches, list(info.cached_block_ids), 0, snapshot=not in_place)
                transfer.send_layer_ranks(layer, caches, list(info.block_ids), info.first_block_index,
                                          snapshot=not in_place)
            except Exception as exc:  # a broken transfer must not stop the engine's step
                logger.warning("KV transfer for %s failed: %s", info.request_id, exc)
                self.transfers.pop(info.request_id, None)

    def _pin(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        pinned = self.pins.setdefault(request_id, {})
        new = [b for b in dict.fromkeys(block_ids) if b not in pinned]
        self.pool.touch(self.pool.blocks[b] for b in new)
        pinned.update(dict.fromkeys(new))
        self.num_pinned += len(new)

    def release(self, request_id: str) -> None:
        """Unpin the request's blocks (engine thread, between steps; nothing when none are pinned)."""
        pinned = self.pins.pop(request_id, None)
        if pinned:
            self.pool.free(self.pool.blocks[b] for b in reversed(pinned))
            self.num_pinned -= len(pinned)


class PrefillServicer(prefill_pb2_grpc.PrefillWorkerServicer):
    """pdserve.v1.PrefillWorker."""

    def __init__(self, ctx: WorkerContext, streamer: LayerStreamer, sender: TCPKVSender,
                 queue: QueueBound | None = None, connect_timeout_s: float = KV_CONNECT_TIMEOUT_S):
        self.ctx = ctx
        self.connect_timeout_s = connect_timeout_s
        self.running = RequestIds()  # a second Prefill of a running id would replace its transfer
        self.queue = queue or QueueBound(what="prefill queue")  # Prefill calls not yet answered
        self.streamer = streamer
        self.sender = sender
        self.background: set[asyncio.Task] = set()

    @map_errors
    async def Prefill(self, request, context):
        """Compute the prompt's KV (streamed to the target as it is computed) and return the
        first token of each sample; the transfer's end is awaited in the background."""
        self.ctx.lifecycle.check_accepting("Prefill")
        trace = WorkerRequestTrace(spans.PREFILL, request.request_id, request.trace_context, context,
                                   self.ctx.metrics, "prefill", self.ctx.worker_id, forward=True)
        try:
            with self.queue.hold(), self.ctx.lifecycle.track(), self.running.hold(request.request_id):
                response = await self._prefill(request, trace)
        except BaseException as exc:
            trace.end(exc)
            raise
        trace.end()
        return response

    async def _prefill(self, request, trace: WorkerRequestTrace) -> prefill_pb2.PrefillResponse:
        params = sampling_params_from_engine_proto(request.sampling)
        check_prefill(request, params, self.ctx.engine)  # before the handshake holds anything
        prompt = list(request.prompt_token_ids)
        transfer, kv_span = await self._open_transfer(request, len(prompt), trace)
        self.streamer.transfers[request.request_id] = transfer
        first_only = first_token_params(params)
        merged = None
        trace.submitted()
        try:
            async for output in self.ctx.async_engine.generate(request.request_id, prompt, first_only):
                trace.on_output(output)
                merged = output if merged is None else _merge(merged, output)
            if merged is None or any(s.finish_reason == "abort" for s in merged.samples):
                raise UnavailableError(f"request {request.request_id!r} was aborted on this prefill server")
        except BaseException as exc:
            self.streamer.transfers.pop(request.request_id, None)
            await asyncio.to_thread(transfer.cancel)
            await self._unpin(request.request_id)
            self._count_transfer(kv_span, transfer, None, exc)
            raise
        self.streamer.transfers.pop(request.request_id, None)
        task = asyncio.create_task(self._finish(request.request_id, transfer, kv_span))
        self.background.add(task)  # counted in flight by the lifecycle until the KV is in
        task.add_done_callback(self.background.discard)
        for sample in merged.samples:  # reason and text under the request's own params, not max_tokens=1
            sample.finish_reason, sample.text = outcome_after(self.ctx.engine, prompt, params, sample.token_ids)
        return prefill_pb2.PrefillResponse(output=request_output_to_proto(merged))

    async def _open_transfer(self, request, num_tokens: int, trace: WorkerRequestTrace):
        """Handshake with the decode server's receiver, under a kv.transfer span whose
        context travels in the handshake (the receiver's span joins the trace)."""
        target = request.kv_target
        kv_span = spans.start(spans.KV_TRANSFER, trace.span, SpanKind.PRODUCER)
        if kv_span.is_recording():
            kv_span.set_attributes({spans.PDSERVE_KV_ENDPOINT: target.kv_endpoint,
                                    spans.PDSERVE_RESERVATION_ID: target.reservation_id})
        try:
            transfer = await self._handshake(target, num_tokens, tracing.inject(kv_span))
        except BaseException as exc:
            self._count_transfer(kv_span, None, None, exc)
            error = transfer_error(exc, target.kv_endpoint) if isinstance(exc, Exception) else exc
            if error is exc:
                raise
            raise error from exc
        if kv_span.is_recording():
            kv_span.set_attribute(spans.PDSERVE_KV_DATA_PATH, transfer.data_path)
        return transfer, kv_span

    async def _handshake(self, target, num_tokens: int, carrier: dict[str, str]) -> KVTransfer:
        """sender.open in a thread, bounded by connect_timeout_s. If the call is cancelled
        meanwhile (client gone, deadline), a transfer that still opens is cancelled at once."""
        opening = asyncio.ensure_future(asyncio.to_thread(
            self.sender.open, target.kv_endpoint, target.reservation_id, num_tokens,
            list(target.block_ids), carrier, self.connect_timeout_s, target.held_blocks))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_cancel_if_opened)
            raise

    async def _finish(self, request_id: str, transfer: KVTransfer, kv_span) -> None:
        try:
            stats = await asyncio.to_thread(transfer.finish, TRANSFER_TIMEOUT_S)
        except Exception as exc:  # the decode side sees the failure on its own reservation
            logger.warning("KV transfer for %s did not complete: %s", request_id, exc)
            self._count_transfer(kv_span, transfer, None, exc)
            return
        finally:  # the transfer is over (confirmed, failed or timed out): nobody reads its blocks now
            await self._unpin(request_id)
        self._count_transfer(kv_span, transfer, stats, None)

    async def _unpin(self, request_id: str) -> None:
        """Unpin the blocks a NIXL transfer of the request held. Always through the engine thread,
        between steps: a step running now may still pin blocks for it."""
        if self.sender.nixl is None:
            return
        try:
            await self.ctx.async_engine.run_between_steps(lambda _: self.streamer.release(request_id))
        except Exception as exc:  # the engine is gone: its blocks with it
            logger.warning("unpinning the KV blocks of %s failed: %s", request_id, exc)

    @property
    def offered_data_path(self) -> str:
        """The data path this server's handshakes offer ("nixl" when it has NIXL, else "tcp")."""
        return "nixl" if self.sender.nixl is not None else "tcp"

    def _count_transfer(self, kv_span, transfer: KVTransfer | None, stats: TransferStats | None,
                        error: BaseException | None) -> None:
        """KV metrics (direction "sent", by data path) and the end of the kv.transfer span."""
        if stats is not None:
            self.ctx.metrics.observe_transfer("sent", stats.bytes, stats.seconds, ok=True, data_path=stats.data_path)
            if kv_span.is_recording():
                kv_span.set_attributes({spans.PDSERVE_KV_BYTES: stats.bytes, spans.PDSERVE_KV_BLOCKS: stats.blocks,
                                        spans.PDSERVE_KV_FRAMES: stats.frames, spans.PDSERVE_KV_SECONDS: stats.seconds,
                                        spans.PDSERVE_KV_DATA_PATH: stats.data_path})
        else:
            data_path = transfer.data_path if transfer is not None else self.offered_data_path
            self.ctx.metrics.observe_transfer("sent", 0, 0.0, ok=False, data_path=data_path)
        spans.end_with_error(kv_span, error)

    async def abort_transfer(self, request_id: str) -> bool:
        """Abort hook: cancel the request's open transfer, if any."""
        transfer = self.streamer.transfers.pop(request_id, None)
        if transfer is not None:
            await asyncio.to_thread(transfer.cancel)
            await self._unpin(request_id)
        return transfer is not None


def _cancel_if_opened(opening: asyncio.Future) -> None:
    """Done callback of an abandoned handshake: cancel the transfer it opened, if it did."""
    if opening.cancelled() or opening.exception() is not None:
        return
    asyncio.get_running_loop().run_in_executor(None, opening.result().cancel)


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Fold a later output of the same request into `a` (samples by index)."""
    by_index = {s.index: s for s in a.samples}
    for delta in b.samples:
        if delta.index in by_index:
            by_index[delta.index].merge(delta)
        else:
            by_index[delta.index] = delta
    a.samples = [by_index[i] for i in sorted(by_index)]
    a.cached_tokens = max(a.cached_tokens, b.cached_tokens)
    a.prompt_logprobs = a.prompt_logprobs or b.prompt_logprobs
    return a


async def setup(ctx: WorkerContext, settings: PrefillSettings):
    """Install the layer hook on the engine, and return (register, service names)."""
    kv_caches = ctx.engine.runner.rank_kv_caches
    streamer = LayerStreamer(kv_caches, ctx.engine.pool)
    ctx.async_engine = AsyncEngine(ctx.engine, layer_hook=streamer)
    ctx.abort_hooks = [ctx.async_engine.abort]
    sender = kv_sender(settings, ctx.worker_id, kv_caches, ctx.engine.runner.model.config.num_kv_heads,
                       ctx.telemetry.registry, lambda: streamer.num_pinned)
    servicer = PrefillServicer(ctx, streamer, sender,
                               settings.queue_bound("prefill queue"), settings.kv_connect_timeout_s)
    ctx.abort_hooks.append(servicer.abort_transfer)
    ctx.close_hooks.append(servicer.sender.close)
    ctx.lifecycle.add_source(lambda: len(servicer.background))  # transfers still finishing
    names = [prefill_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name]
    return (lambda server: prefill_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)), names
