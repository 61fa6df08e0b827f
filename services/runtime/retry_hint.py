"""The retry hint that goes with every RESOURCE_EXHAUSTED pdserve sends (an overloaded router or
worker), in two forms a client can read:

- trailing metadata `retry-after-ms: <int>` (milliseconds; any gRPC client reads it), and
- `grpc-status-details-bin`: a google.rpc.Status holding a google.rpc.RetryInfo (what
  grpcio-status, grpc-gateway and Google's client libraries understand).

    trailing = overload_trailing_metadata(1000, "the router has 256 requests in flight")
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details, trailing)
    ...
    except grpc.aio.AioRpcError as error:
        if is_overloaded(error):
            delay_ms = retry_after_ms_of(error)   # 1000
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

RETRY_AFTER_MS_KEY = "retry-after-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
DEFAULT_RETRY_AFTER_MS = 1000  # an overloaded server that names no better delay

Metadata = Iterable[tuple[str, str | bytes]]


def overload_trailing_metadata(retry_after_ms: int, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata for a RESOURCE_EXHAUSTED whose details are `message`: retry-after-ms
    and the google.rpc.Status with a RetryInfo of the same delay."""
    retry_after_ms = max(0, int(retry_after_ms))
    delay = duration_pb2.Duration(seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    return ((RETRY_AFTER_MS_KEY, str(retry_after_ms)), (STATUS_DETAILS_KEY, status.SerializeToString()))


def retry_after_ms_from_metadata(metadata: Metadata | None) -> int | None:
    """The hint in trailing metadata: retry-after-ms, else a RetryInfo in the status details;
    None when there is neither (or they do not parse)."""
    status_bytes = None
    for key, value in metadata or ():
        if key == RETRY_AFTER_MS_KEY:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                continue
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status_bytes = value
    return _retry_info_ms(status_bytes) if status_bytes is not None else None


def _retry_info_ms(status_bytes: bytes) -> int | None:
    status = status_pb2.Status()
    try:
        status.ParseFromString(status_bytes)
    except Exception:  # noqa: BLE001 - a peer's malformed details are not our failure
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            return info.retry_delay.seconds * 1000 + info.retry_delay.nanos // 1_000_000
    return None


def is_overloaded(error: BaseException) -> bool:
    """True for a gRPC call that ended with RESOURCE_EXHAUSTED (an overloaded pdserve server)."""
    return isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)) \
        and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def retry_after_ms_of(error: BaseException) -> int | None:
    """The retry hint of a failed gRPC call (grpc.aio.AioRpcError or a sync grpc.RpcError),
    or None when it carries none."""
    trailing = getattr(error, "trailing_metadata", None)
    if not callable(trailing):
        return None
    return retry_after_ms_from_metadata(trailing())
