"""The receiver's table of reservations: reserved destination blocks waiting for a prompt's KV.

Thread safety: one lock guards every reservation. A connection writes into a reservation's blocks
only between begin_write() and end_write(); cancel() waits for such a write to stop (aborting its
connection first), so once cancel() returns nothing writes into those blocks any more and the caller
may hand them to another request.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pdserve.kvtransfer.backend import OnComplete, ReceivedTransfer, TransferObserver
from pdserve.kvtransfer.errors import KVTransferCancelled, KVTransferError, UnknownReservation
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.wire import Hello

log = logging.getLogger(__name__)


class Abortable(Protocol):
    """A connection that can be cut from another thread."""

    def abort(self, code: str, message: str) -> None: ...


@dataclass(eq=False)
class ExpectedTransfer:
    """The receiver's record of one transfer it expects into blocks reserved for a prompt (it has no
    expiry of its own: the decode server closes it when its KVLease ends). Only the first
    `num_blocks` = ceil(num_tokens / block_size) of dst_block_ids receive KV (a reservation may
    hold more, for the tokens decode will add), less the first `held_blocks`, which the receiver
    holds already (shared prefix-cache blocks: writing them is a protocol error). received: bool
    [num_layers, num_blocks], which (layer, block) pairs are in. The fields after `received`
    belong to the connection filling it."""

    reservation_id: str
    dst_block_ids: tuple[int, ...]
    num_tokens: int
    num_blocks: int
    on_complete: OnComplete
    received: np.ndarray
    held_blocks: int = 0
    connection: Abortable | None = None
    writing: bool = False
    closed: bool = False
    bytes_received: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # the sender's handshake metadata (trace context)
    bound_unix_ns: int = 0  # when a handshake bound it (time.time_ns())
    bound_monotonic: float = 0.0
    data_path: str = "tcp"  # how the bound connection moves the K/V


class ReservationTable:
    """Registered reservations by id, for a cache of `num_cache_blocks` blocks with `layout`."""

    def __init__(self, layout: KVLayout, num_cache_blocks: int, observer: TransferObserver | None = None):
        self.layout = layout
        self.num_cache_blocks = num_cache_blocks
        self.observer = observer  # told of every bound reservation that ends (finished or failed)
        self._by_id: dict[str, ExpectedTransfer] = {}
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._by_id)

    def __contains__(self, reservation_id: str) -> bool:
        with self._cond:
            return reservation_id in self._by_id

    def get(self, reservation_id: str) -> ExpectedTransfer | None:
        """The registered reservation with that id, if any (read-only use)."""
        with self._cond:
            return self._by_id.get(reservation_id)

    def add(self, reservation_id: str, dst_block_ids: list[int], num_tokens: int,
            on_complete: OnComplete, held_blocks: int = 0) -> None:
        """Register a reservation; ValueError on a duplicate id or blocks that cannot hold the prompt."""
        ids = tuple(int(b) for b in dst_block_ids)
        needed = self.layout.num_blocks_for(num_tokens) if num_tokens >= 1 else 0
        if not isinstance(reservation_id, str) or not 0 < len(reservation_id) <= 256:
            raise ValueError("reservation_id must be a non-empty string of at most 256 characters")
        if num_tokens < 1:
            raise ValueError(f"reservation {reservation_id}: num_tokens must be >= 1, got {num_tokens}")
        if len(ids) < needed:
            raise ValueError(f"reservation {reservation_id}: {len(ids)} blocks cannot hold {num_tokens} "
                             f"tokens ({needed} blocks of {self.layout.block_size})")
        bad = [b for b in ids if not 0 <= b < self.num_cache_blocks]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"reservation {reservation_id}: block ids must be distinct and in "
                             f"[0, {self.num_cache_blocks}), got {'out of range ' + str(bad[:5]) if bad else 'repeats'}")
        if not 0 <= held_blocks <= needed:
            raise ValueError(f"reservation {reservation_id}: held_blocks {held_blocks} not in [0, {needed}]")
        received = np.zeros((self.layout.num_layers, needed), dtype=bool)
        received[:, :held_blocks] = True
        with self._cond:
            if reservation_id in self._by_id:
                raise ValueError(f"reservation {reservation_id} is already registered")
            self._by_id[reservation_id] = ExpectedTransfer(reservation_id, ids, num_tokens, needed,
                                                           on_complete, received, held_blocks)

    def bind(self, hello: Hello, connection: Abortable, data_path: str = "tcp") -> ExpectedTransfer:
        """Attach a handshaking connection (moving the K/V by data_path) to the reservation it
        names; raises a KVTransferError
        (UnknownReservation, or a mismatch of num_tokens / dst_block_ids, or already being filled)."""
        rid = hello.reservation_id
        with self._cond:
            res = self._by_id.get(rid)
            if res is None:
                raise UnknownReservation(f"no reservation {rid!r} on this receiver (never made, expired "
                                         f"or cancelled)")
            if res.connection is not None:
                raise KVTransferError(f"reservation {rid!r} is already being filled by another connection",
                                      code="reservation_busy")
            if hello.num_tokens != res.num_tokens:
                raise KVTransferError(f"reservation {rid!r} holds {res.num_tokens} tokens, the sender "
                                      f"sends {hello.num_tokens}", code="size_mismatch")
            if hello.dst_block_ids is not None and hello.dst_block_ids != res.dst_block_ids:
                raise KVTransferError(f"reservation {rid!r}: the sender's dst_block_ids differ from the "
                                      f"reserved blocks", code="size_mismatch")
            if hello.held_blocks != res.held_blocks:
                raise KVTransferError(f"reservation {rid!r}: this receiver holds {res.held_blocks} leading blocks "
                                      f"already, the sender skips {hello.held_blocks}", code="size_mismatch")
            res.connection = connection
            res.data_path = data_path
            res.metadata = dict(hello.metadata or {})
            res.bound_unix_ns, res.bound_monotonic = time.time_ns(), time.monotonic()
            return res

    def has_sender(self, reservation_id: str) -> bool:
        """True while a sender's connection is bound to the open reservation (its KV is on the way,
        or its prompt still queued on the prefill server)."""
        with self._cond:
            res = self._by_id.get(reservation_id)
            return res is not None and not res.closed and res.connection is not None

    def begin_write(self, res: ExpectedTransfer) -> bool:
        """Claim the right to write into res's blocks; False once it is cancelled or finished."""
        with self._cond:
            if res.closed:
                return False
            res.writing = True
            return True

    def end_write(self, res: ExpectedTransfer) -> None:
        """Release the claim taken by begin_write."""
        with self._cond:
            res.writing = False
            self._cond.notify_all()

    def cancel(self, reservation_id: str) -> bool:
        """Forget a reservation without calling its on_complete. Returns once no connection writes
        into its blocks; False if it was not registered (already finished, failed or cancelled)."""
        with self._cond:
            res = self._by_id.get(reservation_id)
            if res is None:
                return False
            self._close_locked(res, f"reservation {reservation_id!r} was cancelled by the receiver")
            return True

    def finish(self, res: ExpectedTransfer, error: Exception | None) -> bool:
        """Close res and report the outcome to its on_complete (called on this thread, outside the
        lock). False, without a call, if it was already closed (e.g. cancelled)."""
        with self._cond:
            if res.closed:
                return False
            self._close_locked(res, None)
        self._report(res, error)
        return True

    def fail_all(self, message: str) -> None:
        """Fail every reservation with KVTransferCancelled(message) (receiver shutdown)."""
        with self._cond:
            closing = list(self._by_id.values())
            for res in closing:
                self._close_locked(res, message)
        for res in closing:
            self._report(res, KVTransferCancelled(message))

    def _close_locked(self, res: ExpectedTransfer, abort_message: str | None) -> None:
        """Mark res closed and unregistered; with abort_message, cut its connection and wait until it
        no longer writes into res's blocks. Holds self._cond."""
        res.closed = True
        self._by_id.pop(res.reservation_id, None)
        if abort_message is not None and res.connection is not None:
            res.connection.abort("cancelled", abort_message)
        self._cond.wait_for(lambda: not res.writing)

    def _report(self, res: ExpectedTransfer, error: Exception | None) -> None:
        if self.observer is not None and res.connection is not None:
            report = ReceivedTransfer(res.reservation_id, res.metadata, res.bytes_received,
                                      res.num_blocks - res.held_blocks,
                                      res.bound_unix_ns, time.monotonic() - res.bound_monotonic, error,
                                      res.data_path)
            try:
                self.observer(report)
            except Exception:  # telemetry must not kill the connection thread
                log.exception("transfer observer for reservation %s raised", res.reservation_id)
        try:
            res.on_complete(res.reservation_id, error)
        except Exception:  # a caller's bug must not kill the connection thread
            log.exception("on_complete callback for reservation %s raised", res.reservation_id)
