"""The colocated worker: one engine doing both phases (chunked prefill), the baseline that
disaggregation is measured against and the simplest single-box deployment."""

from __future__ import annotations

from protos.pdserve.v1 import colocated_pb2, colocated_pb2_grpc
from services.grpc_common.convert import sampling_params_from_engine_proto
from services.grpc_common.status import map_errors
from services.workers.convert import request_output_to_proto
from services.workers.runtime import WorkerContext


class ColocatedServicer(colocated_pb2_grpc.ColocatedWorkerServicer):
    """pdserve.v1.ColocatedWorker: Generate streams a request's outputs from this engine."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    @map_errors
    async def Generate(self, request, context):
        """Run the request here and stream its outputs; leaving early aborts it."""
        params = sampling_params_from_engine_proto(request.sampling)
        stream = self.ctx.async_engine.generate(request.request_id, list(request.prompt_token_ids), params)
        async for output in stream:
            yield request_output_to_proto(output)


async def setup(ctx: WorkerContext, ns=None):
    """The server registration function and service names for serve_worker."""
    servicer = ColocatedServicer(ctx)
    names = [colocated_pb2.DESCRIPTOR.services_by_name["ColocatedWorker"].full_name]
    return (lambda server: colocated_pb2_grpc.add_ColocatedWorkerServicer_to_server(servicer, server)), names
