"""The colocated worker: one engine doing both phases (chunked prefill), the baseline that
disaggregation is measured against and the simplest single-box deployment."""

from __future__ import annotations

import contextlib

from pdserve.runtime.sampling_proto import sampling_params_from_engine_proto
from pdserve.runtime.status import map_errors
from pdserve.settings import ColocatedSettings
from pdserve.telemetry import spans
from pdserve.v1 import colocated_pb2, colocated_pb2_grpc
from pdserve.workers.convert import request_output_to_proto
from pdserve.workers.keepalive import with_keepalive
from pdserve.workers.queue_bound import QueueBound
from pdserve.workers.request_checks import RequestIds
from pdserve.workers.request_trace import WorkerRequestTrace
from pdserve.workers.runtime import WorkerContext


class ColocatedServicer(colocated_pb2_grpc.ColocatedWorkerServicer):
    """pdserve.v1.ColocatedWorker: Generate streams a request's outputs from this engine."""

    def __init__(self, ctx: WorkerContext, queue: QueueBound | None = None, keepalive_s: float = 5.0):
        self.ctx = ctx
        self.keepalive_s = keepalive_s
        self.queue = queue or QueueBound(what="colocated worker's waiting queue")
        self.running = RequestIds()  # a second Generate of a running id: ALREADY_EXISTS

    @map_errors
    async def Generate(self, request, context):
        """Run the request here and stream its outputs; leaving early aborts it. With samples, continue
        them from their generated tokens (their text is restated in their first output)."""
        self.ctx.lifecycle.check_accepting("Generate")
        self.queue.check(self.ctx.async_engine.stats().num_waiting_requests)
        trace = WorkerRequestTrace(spans.WORKER_GENERATE, request.request_id, request.trace_context, context,
                                   self.ctx.metrics, "colocated", self.ctx.worker_id, forward=True,
                                   count_finished=True)
        error: BaseException | None = None
        try:
            params = sampling_params_from_engine_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            if request.samples:  # a continuation (a retry elsewhere): recompute prompt + tokens here
                stream = self.ctx.async_engine.generate_prefilled(
                    request.request_id, prompt, params, [list(s.generated_token_ids) for s in request.samples],
                    [s.index for s in request.samples])
            else:
                stream = self.ctx.async_engine.generate(request.request_id, prompt, params)
            with self.ctx.lifecycle.track(), self.running.hold(request.request_id):
                outputs = with_keepalive(self._protos(stream, trace), request.request_id, self.keepalive_s)
                async with contextlib.aclosing(outputs) as outputs:
                    async for output in outputs:
                        yield output
        except BaseException as exc:
            error = exc
            raise
        finally:
            trace.end(error)

    @staticmethod
    async def _protos(stream, trace: WorkerRequestTrace):
        """The engine's outputs as protos, traced."""
        async with contextlib.aclosing(stream) as outputs:
            async for output in outputs:
                trace.on_output(output)
                yield request_output_to_proto(output)


async def setup(ctx: WorkerContext, settings: ColocatedSettings):
    """The server registration function and service names for serve_worker."""
    servicer = ColocatedServicer(ctx, settings.queue_bound("colocated worker's waiting queue"),
                                 settings.stream_keepalive_s)
    names = [colocated_pb2.DESCRIPTOR.services_by_name["ColocatedWorker"].full_name]
    return (lambda server: colocated_pb2_grpc.add_ColocatedWorkerServicer_to_server(servicer, server)), names
