"""The colocated worker: one engine doing both phases (chunked prefill), the baseline that
disaggregation is measured against and the simplest single-box deployment."""

from __future__ import annotations

import contextlib

from protos.pdserve.v1 import colocated_pb2, colocated_pb2_grpc
from services.grpc_common.convert import sampling_params_from_engine_proto
from services.grpc_common.status import map_errors
from services.telemetry import spans
from services.workers.convert import request_output_to_proto
from services.workers.request_trace import WorkerRequestTrace
from services.workers.runtime import WorkerContext


class ColocatedServicer(colocated_pb2_grpc.ColocatedWorkerServicer):
    """pdserve.v1.ColocatedWorker: Generate streams a request's outputs from this engine."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    @map_errors
    async def Generate(self, request, context):
        """Run the request here and stream its outputs; leaving early aborts it."""
        self.ctx.lifecycle.check_accepting("Generate")
        trace = WorkerRequestTrace(spans.WORKER_GENERATE, request.request_id, request.trace_context, context,
                                   self.ctx.metrics, "worker", self.ctx.worker_id, forward=True,
                                   count_finished=True)
        error: BaseException | None = None
        try:
            params = sampling_params_from_engine_proto(request.sampling)
            stream = self.ctx.async_engine.generate(request.request_id, list(request.prompt_token_ids), params)
            with self.ctx.lifecycle.track():
                async with contextlib.aclosing(stream) as outputs:
                    async for output in outputs:
                        trace.on_output(output)
                        yield request_output_to_proto(output)
        except BaseException as exc:
            error = exc
            raise
        finally:
            trace.end(error)


async def setup(ctx: WorkerContext, ns=None):
    """The server registration function and service names for serve_worker."""
    servicer = ColocatedServicer(ctx)
    names = [colocated_pb2.DESCRIPTOR.services_by_name["ColocatedWorker"].full_name]
    return (lambda server: colocated_pb2_grpc.add_ColocatedWorkerServicer_to_server(servicer, server)), names
