"""One receiver connection: handshake, then LAYER frames written into the reserved blocks.

Every header field is checked before a byte lands in the cache. Any malformed frame, refused
handshake or dropped connection ends only this connection (an ERROR frame is sent when possible);
a reservation bound to it is reported failed, so the decode side frees its blocks.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import struct
import threading
import time

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.block_io import CacheBlocks
from pdserve.kvtransfer.errors import (
    KVAuthError,
    KVLayoutMismatch,
    KVProtocolError,
    KVTransferCancelled,
    KVTransferError,
)
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.nixl_data import NixlReceiveSide
from pdserve.kvtransfer.reservations import ExpectedTransfer, ReservationTable
from pdserve.kvtransfer.sockio import recv_exact, recv_into_views, send_views
from pdserve.kvtransfer.wire import NixlOffer

log = logging.getLogger(__name__)

_DRAIN_SECONDS = 2.0  # after an ERROR frame, read and drop input so the peer can read the error


class _Cancelled(Exception):
    """The decode side cancelled the reservation: stop without reporting (it already knows)."""


class ReceiveSession:
    """Serves one accepted socket until it closes. `run` is the thread body and never raises."""

    def __init__(self, sock: socket.socket, peer: str, layout: KVLayout, table: ReservationTable,
                 blocks: CacheBlocks, auth_token: str | None = None, handshake_timeout_s: float = 10.0,
                 idle_timeout_s: float | None = None, ssl_context: ssl.SSLContext | None = None,
                 nixl: NixlReceiveSide | None = None, require_nixl: bool = False):
        self.sock = sock
        self.nixl = nixl
        self.require_nixl = require_nixl
        self._offer: NixlOffer | None = None  # set when this transfer's K/V move by NIXL READs
        self._sender_layout: KVLayout | None = None
        self._nixl_peer: str | None = None
        self._read_failed = False
        self.ssl_context = ssl_context
        self.peer = peer
        self.layout = layout
        self.table = table
        self.blocks = blocks
        self.auth_token = auth_token
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._send_lock = threading.Lock()
        self._aborted = False

    def run(self) -> None:
        """Handshake, stream, close; errors end this connection only."""
        res: ExpectedTransfer | None = None
        try:
            self.sock.settimeout(self.handshake_timeout_s)
            if self.ssl_context is not None:  # handshake after the swap, so abort() can cut it
                self.sock = self.ssl_context.wrap_socket(self.sock, server_side=True,
                                                         do_handshake_on_connect=False)
                self.sock.do_handshake()
            res = self._handshake()
            self.sock.settimeout(self.idle_timeout_s)
            self._stream(res)
        except _Cancelled:
            pass
        except KVTransferError as exc:
            self._fail(res, exc, send_error=True)
        except OSError as exc:  # PeerClosed (EOF), resets, timeouts, TLS errors
            where = "during the handshake" if res is None else f"while filling reservation {res.reservation_id!r}"
            self._fail(res, KVTransferError(f"connection from {self.peer} lost {where}: {exc}",
                                            code="connection_lost"), send_error=False)
        except Exception as exc:  # a bug: still never take the server down
            log.exception("KV receive session from %s failed", self.peer)
            self._fail(res, KVTransferError(f"receiver error: {exc}"), send_error=True)
        finally:
            self.sock.close()
            if self._nixl_peer is not None:
                self.nixl.release(self._nixl_peer, failed=self._read_failed)

    def abort(self, code: str, message: str) -> None:
        """Called from another thread (a cancel): tell the peer, then cut the socket, which wakes a
        blocked read here."""
        self._aborted = True
        self._send_error(code, message, flags=socket.MSG_DONTWAIT)
        try:  # the plain-socket shutdown: on TLS it leaves the SSL object to the reading thread
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _handshake(self) -> ExpectedTransfer:
        frame_type, size = self._read_header()
        if frame_type != wire.HELLO:
            raise KVProtocolError(f"expected HELLO, got {wire.FRAME_NAMES[frame_type]}")
        if size > wire.MAX_JSON_PAYLOAD:
            raise KVProtocolError(f"HELLO of {size} bytes exceeds the {wire.MAX_JSON_PAYLOAD}-byte limit")
        hello = wire.Hello.decode(recv_exact(self.sock, size))
        if self.auth_token is not None and not hmac.compare_digest(
                (hello.auth_token or "").encode(), self.auth_token.encode()):
            raise KVAuthError("the KV transfer auth token is missing or wrong")
        self.layout.check_compatible(hello.layout, "receiver", "sender")
        if not hello.states_ranks and self.layout.tensor_parallel_size > 1:
            raise KVLayoutMismatch(f"this decode server's cache is split over {self.layout.tensor_parallel_size} "
                                   "tensor-parallel ranks and the sender (a release before tensor parallelism) cannot "
                                   "send it in that layout: upgrade the prefill server")
        data_path = self._choose_data_path(hello)
        res = self.table.bind(hello, self, data_path)
        self._send(wire.encode_json_frame(wire.HELLO_OK, {"num_blocks": res.num_blocks, "data_path": data_path,
                                                          "layout": self.layout.to_dict()}))
        self._sender_layout = hello.layout
        return res

    def _choose_data_path(self, hello: wire.Hello) -> str:
        """NIXL when the sender offers it and this receiver has it, else TCP (refused before the
        reservation is bound when this receiver requires NIXL, so another sender may still fill it).
        Where neither side requires NIXL and the tensor-parallel sizes cut heads out of blocks, TCP: the
        sender assembles each LAYER frame in one copy, where NIXL would READ each token's heads apart
        (measured on one host, 64 MiB from 2 ranks into 1: TCP 1.0x of an unmapped transfer, NIXL 3.9x)."""
        if (self.nixl is not None and hello.nixl is not None and not (self.require_nixl or hello.nixl_required)
                and not hello.layout.maps_whole_blocks(self.layout)):
            return "tcp"
        if hello.nixl is None or self.nixl is None:
            if hello.nixl_required and self.nixl is None:
                raise KVTransferError("the sender takes KV over NIXL only (--kv-transfer nixl) and this decode server "
                                      "has no NIXL", code="data_path_mismatch")
            if self.require_nixl:
                raise KVTransferError("this decode server takes KV over NIXL only (--kv-transfer nixl) and "
                                      "the sender did not offer it", code="data_path_mismatch")
            return "tcp"
        self._nixl_peer = self.nixl.accept(hello.nixl)
        self._offer = hello.nixl
        return "nixl"

    def _stream(self, res: ExpectedTransfer) -> None:
        while True:
            frame_type, size = self._read_header()
            if frame_type == wire.LAYER and self._offer is None:
                self._receive_layer(res, size)
            elif frame_type == wire.READY and self._offer is not None:
                self._read_layer(res, size)
            elif frame_type == wire.FINISH:
                self._expect_empty(frame_type, size)
                self._complete(res)
                return
            elif frame_type == wire.KEEPALIVE:
                self._expect_empty(frame_type, size)
            elif frame_type == wire.CANCEL:
                self._expect_empty(frame_type, size)
                self.table.finish(res, KVTransferCancelled(
                    f"the sender {self.peer} cancelled reservation {res.reservation_id!r}"))
                return
            else:
                raise KVProtocolError(f"unexpected {wire.FRAME_NAMES[frame_type]} frame after the handshake")

    def _layer_header(self, res: ExpectedTransfer, size: int, frame: str) -> tuple[int, int, int]:
        """Read and check a LAYER or READY sub-header -> (layer, first block, block count)."""
        if size < wire.LAYER_HEADER.size:
            raise KVProtocolError(f"{frame} payload of {size} bytes is shorter than its sub-header")
        layer, first, count = wire.LAYER_HEADER.unpack(recv_exact(self.sock, wire.LAYER_HEADER.size))
        if layer >= self.layout.num_layers:
            raise KVProtocolError(f"{frame} {layer} out of range: the layout has {self.layout.num_layers} layers")
        if count < 1:
            raise KVProtocolError(f"{frame} {layer} carries no blocks")
        if first < res.held_blocks or first + count > res.num_blocks:
            raise KVProtocolError(f"{frame} {layer} blocks [{first}, {first + count}) are outside the "
                                  f"reservation's blocks to fill [{res.held_blocks}, {res.num_blocks})")
        return layer, first, count

    def _read_layer(self, res: ExpectedTransfer, size: int) -> None:
        """READY: READ those blocks from the sender's cache into the reserved blocks."""
        layer, first, count = self._layer_header(res, size, "READY")
        if size != wire.LAYER_HEADER.size + 4 * count:
            raise KVProtocolError(f"READY {layer} payload is {size} bytes, {count} source block ids need "
                                  f"{wire.LAYER_HEADER.size + 4 * count}")
        src = list(struct.unpack(f"!{count}I", recv_exact(self.sock, 4 * count)))
        if not self.table.begin_write(res):
            raise _Cancelled()
        try:  # not interrupted by abort(): the READ runs to its end (or its timeout) before end_write
            self.nixl.read_layer(self._nixl_peer, self._offer, self._sender_layout, layer, src,
                                 list(res.dst_block_ids[first:first + count]))
        except KVTransferError:
            self._read_failed = True
            raise
        finally:
            self.table.end_write(res)
        if self._aborted:
            raise _Cancelled()
        res.received[layer, first:first + count] = True
        res.bytes_received += 2 * count * self.layout.server_block_bytes

    def _receive_layer(self, res: ExpectedTransfer, size: int) -> None:
        layer, first, count = self._layer_header(res, size, "LAYER")
        expected = wire.LAYER_HEADER.size + 2 * count * self.layout.server_block_bytes
        if size != expected:
            raise KVProtocolError(f"LAYER {layer} payload is {size} bytes, {count} blocks of K and V "
                                  f"need {expected}")
        dst = list(res.dst_block_ids[first:first + count])
        if not self.table.begin_write(res):
            raise _Cancelled()
        try:
            recv_into_views(self.sock, self.blocks.write_views(layer, dst))
            self.blocks.commit(layer, dst)
        except OSError:
            if self._aborted:
                raise _Cancelled() from None
            raise
        finally:
            self.table.end_write(res)
        res.received[layer, first:first + count] = True
        res.bytes_received += size - wire.LAYER_HEADER.size

    def _complete(self, res: ExpectedTransfer) -> None:
        missing = (~res.received).nonzero()
        if missing[0].size:
            raise KVTransferError(
                f"FINISH before all KV arrived: {missing[0].size} (layer, block) pairs missing, first "
                f"layer {int(missing[0][0])} block {int(missing[1][0])}", code="incomplete")
        complete = wire.encode_json_frame(wire.COMPLETE, {"bytes": res.bytes_received})
        if self._offer is not None:  # what was READ counts only if the sender still held those blocks
            self._send(complete)
            frame_type, size = self._read_header()
            self._expect_empty(frame_type, size)
            if frame_type == wire.CANCEL:
                self.table.finish(res, KVTransferCancelled(
                    f"the sender {self.peer} cancelled reservation {res.reservation_id!r} before confirming"))
                return
            if frame_type != wire.CONFIRM:
                raise KVProtocolError(f"expected CONFIRM after COMPLETE, got {wire.FRAME_NAMES[frame_type]}")
        if not self.table.finish(res, None):
            raise _Cancelled()
        if self._offer is None:
            self._send(complete)

    def _read_header(self) -> tuple[int, int]:
        return wire.decode_header(recv_exact(self.sock, wire.HEADER.size))

    @staticmethod
    def _expect_empty(frame_type: int, size: int) -> None:
        if size != 0:
            raise KVProtocolError(f"{wire.FRAME_NAMES[frame_type]} must have no payload, got {size} bytes")

    def _fail(self, res: ExpectedTransfer | None, error: KVTransferError, send_error: bool) -> None:
        if res is not None:
            self.table.finish(res, error)
        if send_error and not self._aborted:
            log.info("KV connection from %s refused: %s", self.peer, error)
            self._send_error(error.code, str(error))
            self._drain()

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            send_views(self.sock, [data])

    def _send_error(self, code: str, message: str, flags: int = 0) -> None:
        frame = wire.error_frame(code, message[:4000])
        if not self._send_lock.acquire(timeout=1.0):
            return
        try:
            if not flags:
                self.sock.sendall(frame)
            elif not isinstance(self.sock, ssl.SSLSocket):  # OpenSSL: no write while another thread reads
                self.sock.send(frame, flags)
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    def _drain(self) -> None:
        """Half-close and read until the peer closes (bounded), so it can read the ERROR frame before
        our close resets the connection."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_SECONDS
            buf = bytearray(1 << 16)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if self.sock.recv_into(buf) == 0:
                    return
        except OSError:
            pass
