"""gRPC channels to workers, one per address, reused across requests."""

from __future__ import annotations

import asyncio

import grpc

from pdserve.runtime.channels import CHANNEL_OPTIONS, PLAINTEXT, ClientSecurity
from pdserve.v1 import colocated_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc, worker_pb2, worker_pb2_grpc


class WorkerClients:
    """Stubs for every worker service at an address; channels are opened once and kept.
    security: how to dial the workers (TLS / mutual TLS; plaintext by default)."""

    def __init__(self, security: ClientSecurity = PLAINTEXT) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.security = security
        self._background: set[asyncio.Future] = set()  # aborts in flight (the loop holds tasks weakly)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The (lazily opened) channel to `address`."""
        if address not in self._channels:
            self._channels[address] = self.security.aio_channel(address, CHANNEL_OPTIONS)
        return self._channels[address]

    def prefill(self, address: str) -> prefill_pb2_grpc.PrefillWorkerStub:
        """PrefillWorker stub."""
        return prefill_pb2_grpc.PrefillWorkerStub(self.channel(address))

    def decode(self, address: str) -> decode_pb2_grpc.DecodeWorkerStub:
        """DecodeWorker stub."""
        return decode_pb2_grpc.DecodeWorkerStub(self.channel(address))

    def colocated(self, address: str) -> colocated_pb2_grpc.ColocatedWorkerStub:
        """ColocatedWorker stub."""
        return colocated_pb2_grpc.ColocatedWorkerStub(self.channel(address))

    def control(self, address: str) -> worker_pb2_grpc.WorkerControlStub:
        """WorkerControl stub (Abort, GetLoad, GetWorkerInfo)."""
        return worker_pb2_grpc.WorkerControlStub(self.channel(address))

    async def abort(self, address: str, request_id: str, timeout: float = 2.0) -> None:
        """Best-effort abort of a request on a worker (it may already be gone)."""
        try:
            await self.control(address).Abort(worker_pb2.WorkerAbortRequest(request_id=request_id),
                                               timeout=timeout)
        except grpc.aio.AioRpcError:
            pass

    async def abort_all(self, targets: list[tuple[str, str]]) -> None:
        """Abort request ids on workers, as (address, request id) pairs, in tasks of their own:
        a cleanup that runs while its caller is being cancelled still reaches the workers."""
        tasks = [asyncio.ensure_future(self.abort(address, request_id)) for address, request_id in targets]
        self._background.update(tasks)
        for task in tasks:
            task.add_done_callback(self._background.discard)
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))

    async def probe(self, address: str, timeout: float) -> None:
        """Raise grpc.aio.AioRpcError unless the worker at `address` answers within `timeout`."""
        await self.control(address).GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
