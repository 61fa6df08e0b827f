"""The prefill side of the TCP backend: handshake, then one LAYER frame per send_layer call, sent by
a background thread so that sending layer i overlaps computing layer i + 1."""

from __future__ import annotations

import dataclasses
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence

import torch

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.backend import KVSenderBackend, KVTransfer, TransferStats
from pdserve.kvtransfer.block_io import block_views, gather_blocks, tensor_bytes
from pdserve.kvtransfer.errors import KVProtocolError, KVTransferCancelled, KVTransferError, error_from_code
from pdserve.kvtransfer.layout import HeadSlice, KVLayout
from pdserve.kvtransfer.nixl_data import NixlSendSide
from pdserve.kvtransfer.sockio import configure_socket, readable, recv_exact, send_views

_FINISH, _CANCEL = object(), object()


def _cuda_event(tensor: torch.Tensor):
    """An event recorded now on the current stream when `tensor` is on a GPU (the sending thread
    waits for it before the copy's bytes are read), else None."""
    if tensor.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def map_heads(rank_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int],
              head_map: tuple[tuple[HeadSlice, ...], ...], receiver: KVLayout) -> torch.Tensor:
    """The blocks block_ids of one layer in the receiver's layout: [receiver ranks, 2 (K, V), blocks,
    block_size, heads_per_rank, head_dim], each destination rank's heads copied from the rank of this
    server that holds them (rank_caches: this server's (K, V) per rank, [num_blocks, block_size,
    heads_per_rank, head_dim] each)."""
    key = rank_caches[0][0]
    out = torch.empty(receiver.tensor_parallel_size, 2, len(block_ids), receiver.block_size,
                      receiver.heads_per_rank, receiver.head_dim, dtype=key.dtype, device=key.device)
    gathered: dict[int, list[torch.Tensor]] = {}
    for slices in head_map:
        for piece in slices:
            if piece.src_rank not in gathered:  # each rank's cache on its own device (GPU ranks)
                caches = rank_caches[piece.src_rank]
                index = torch.tensor(block_ids, dtype=torch.int64, device=caches[0].device)
                gathered[piece.src_rank] = [cache.index_select(0, index) for cache in caches]
            for half, blocks in enumerate(gathered[piece.src_rank]):
                out[piece.dst_rank, half, :, :, piece.dst_head:piece.dst_head + piece.count] = \
                    blocks[:, :, piece.src_head:piece.src_head + piece.count]
    return out


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port); ValueError when malformed."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"KV endpoint {endpoint!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def read_control_frame(sock: socket.socket) -> tuple[int, dict]:
    """Read one HELLO_OK / COMPLETE / ERROR frame -> (type, JSON payload)."""
    frame_type, size = wire.decode_header(recv_exact(sock, wire.HEADER.size))
    if frame_type not in (wire.HELLO_OK, wire.COMPLETE, wire.ERROR) or size > wire.MAX_JSON_PAYLOAD:
        raise KVProtocolError(f"unexpected {wire.FRAME_NAMES[frame_type]} frame ({size} bytes) from the receiver")
    return frame_type, wire.decode_json(recv_exact(sock, size), wire.FRAME_NAMES[frame_type])


def raise_if_error(frame_type: int, message: dict) -> None:
    """Raise the exception an ERROR frame carries."""
    if frame_type == wire.ERROR:
        raise error_from_code(str(message.get("code")), f"KV receiver refused: {message.get('message')}")


class TCPKVSender(KVSenderBackend):
    """Opens transfers for a prefill server whose cache has `layout`, over a TCP control connection.
    ssl_context: a client context to speak TLS (server_hostname defaults to the endpoint's host);
    auth_token: the shared secret the receivers expect; keepalive_s: how long a transfer may send
    nothing before it sends a KEEPALIVE frame (its prompt still queued).

    nixl: this server's NIXL side; with it each transfer offers the receiver to READ the K/V from
    this server's cache (nixl_data.py), and moves them in LAYER frames when the receiver declines,
    unless require_nixl (then the transfer fails with a clear error)."""

    def __init__(self, layout: KVLayout, ssl_context: ssl.SSLContext | None = None,
                 auth_token: str | None = None, server_hostname: str | None = None,
                 connect_timeout_s: float = 10.0, socket_buffer_bytes: int | None = None,
                 keepalive_s: float = wire.SENDER_KEEPALIVE_S, nixl: NixlSendSide | None = None,
                 require_nixl: bool = False):
        if require_nixl and nixl is None:
            raise ValueError("require_nixl needs a NIXL side")
        self.nixl = nixl
        self.require_nixl = require_nixl
        self.layout = layout
        self.keepalive_s = keepalive_s
        self.ssl_context = ssl_context
        self.auth_token = auth_token
        self.server_hostname = server_hostname
        self.connect_timeout_s = connect_timeout_s
        self.socket_buffer_bytes = socket_buffer_bytes

    def open(self, endpoint: str, reservation_id: str, num_tokens: int,
             dst_block_ids: Sequence[int] | None = None, metadata: dict[str, str] | None = None,
             timeout: float | None = None, held_blocks: int = 0) -> TCPKVTransfer:
        """Connect and handshake (see KVSenderBackend.open)."""
        started = time.perf_counter()
        host, port = parse_endpoint(endpoint)
        offer = self.nixl.offer if self.nixl is not None else None
        hello = wire.Hello(self.layout, reservation_id, num_tokens,
                           None if dst_block_ids is None else tuple(int(b) for b in dst_block_ids),
                           self.auth_token, dict(metadata or {}), offer, held_blocks, self.require_nixl)
        sock = None
        try:
            frame = hello.encode()  # validates nothing yet: the receiver is the judge
            sock = socket.create_connection((host, port), timeout=timeout or self.connect_timeout_s)
            configure_socket(sock, self.socket_buffer_bytes)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname or host)
            send_views(sock, [frame])
            frame_type, reply = read_control_frame(sock)
            raise_if_error(frame_type, reply)
            if frame_type != wire.HELLO_OK or reply.get("num_blocks") != self.layout.num_blocks_for(num_tokens):
                raise KVProtocolError(f"bad handshake reply {wire.FRAME_NAMES[frame_type]} {reply}")
            data_path = self._agreed_data_path(endpoint, reply.get("data_path", "tcp"))
            receiver_layout = self._receiver_layout(endpoint, reply.get("layout"))
            sock.settimeout(None)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return TCPKVTransfer(sock, self.layout, endpoint, reservation_id, reply["num_blocks"], started,
                             self.keepalive_s, self.nixl if data_path == "nixl" else None, held_blocks,
                             receiver_layout)

    def close(self) -> None:
        """Release the NIXL side (its cache registration and agent), if any; transfers must have ended."""
        if self.nixl is not None:
            self.nixl.close()

    def _receiver_layout(self, endpoint: str, data) -> KVLayout:
        """The receiver's layout from HELLO_OK, which this server's heads must map onto (a receiver from
        before tensor parallelism states none: it holds every head in one cache)."""
        if data is None:
            return dataclasses.replace(self.layout, tensor_parallel_size=1)
        try:
            layout = KVLayout.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise KVProtocolError(f"the KV receiver {endpoint} stated no valid layout: {exc}") from None
        self.layout.head_map(layout)  # KVLayoutMismatch (the receiver should have refused already)
        return layout

    def _agreed_data_path(self, endpoint: str, data_path) -> str:
        """The data path HELLO_OK chose, checked against what was offered and required."""
        if data_path not in wire.DATA_PATHS or (data_path == "nixl" and self.nixl is None):
            raise KVProtocolError(f"the KV receiver {endpoint} answered with data path {data_path!r}, "
                                  f"which was not offered")
        if data_path != "nixl" and self.require_nixl:
            raise KVTransferError(f"the KV receiver {endpoint} does not take NIXL transfers and this prefill "
                                  f"server requires them (--kv-transfer nixl)", code="data_path_mismatch")
        return data_path


class _Ready:
    """A queued READY frame: the receiver may READ its blocks once `computed` (a CUDA event, when
    the cache is on a GPU) has completed."""

    def __init__(self, computed):
        self.computed = computed


class TCPKVTransfer(KVTransfer):
    """A handshaken connection and its sending thread (see KVTransfer for the contract). With the
    `nixl` side the blocks are announced in READY frames and the receiver READs them from the
    cache in place (send_layer then takes no snapshot: the caller keeps the blocks unchanged until
    the transfer ends); without, they travel in LAYER frames, in the receiver's layout
    (receiver_layout, by default this server's): when the tensor-parallel sizes differ, each LAYER
    frame is assembled from the ranks holding each destination rank's heads (a copy). The first
    held_blocks logical blocks the receiver holds already: send_layer leaves them out."""

    def __init__(self, sock: socket.socket, layout: KVLayout, endpoint: str, reservation_id: str,
                 num_blocks: int, started: float, keepalive_s: float = wire.SENDER_KEEPALIVE_S,
                 nixl: NixlSendSide | None = None, held_blocks: int = 0, receiver_layout: KVLayout | None = None):
        self.nixl = nixl
        self.data_path = "nixl" if nixl is not None else "tcp"
        if nixl is not None:
            nixl.transfer_opened()
        self.layout = layout
        self.receiver_layout = receiver_layout or layout
        self.head_map = (None if self.receiver_layout.tensor_parallel_size == layout.tensor_parallel_size
                         else layout.head_map(self.receiver_layout))  # None: rank r's blocks go to rank r
        self.keepalive_s = keepalive_s
        self.endpoint = endpoint
        self.reservation_id = reservation_id
        self.num_blocks = num_blocks
        self.held_blocks = held_blocks
        self._sock = sock
        self._started = started
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._ended = False  # finish or cancel was called
        self._error: BaseException | None = None
        self._stats: TransferStats | None = None
        self._bytes = self._frames = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{reservation_id}", daemon=True)
        self._thread.start()

    def send_layer_ranks(self, layer: int, rank_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         src_block_ids: Sequence[int], first_block: int = 0, snapshot: bool = False) -> None:
        """Queue one layer's blocks of every rank (see KVTransfer.send_layer_ranks)."""
        if self._error is not None:
            raise self._error
        if self._ended:
            raise KVTransferError(f"transfer {self.reservation_id!r} is already finished or cancelled")
        ids = (src_block_ids.tolist() if isinstance(src_block_ids, torch.Tensor)
               else [int(b) for b in src_block_ids])
        if len(rank_caches) != self.layout.tensor_parallel_size:
            raise ValueError(f"layer {layer}: caches of {len(rank_caches)} ranks, this server's layout has "
                             f"{self.layout.tensor_parallel_size}")
        for key_cache, value_cache in rank_caches:
            self._check_layer(layer, key_cache, value_cache, ids, first_block)
        key_cache = rank_caches[0][0]
        if first_block < self.held_blocks:  # the receiver has those already
            skipped = min(self.held_blocks - first_block, len(ids))
            ids, first_block = ids[skipped:], first_block + skipped
            if not ids:
                return
        if self.nixl is not None:
            if snapshot:
                raise ValueError("the nixl data path reads the blocks in place and takes no snapshot: keep them "
                                 "unchanged until the transfer ends")
            self._queue.put((layer, first_block, len(ids), _Ready(_cuda_event(key_cache)), ids))
        elif self.head_map is not None:
            copy = map_heads(rank_caches, ids, self.head_map, self.receiver_layout)
            self._queue.put((layer, first_block, len(ids), (copy, _cuda_event(copy)), None))
        elif snapshot or key_cache.device.type != "cpu":
            copy = (gather_blocks(key_cache, rank_caches[0][1], ids).unsqueeze(0) if len(rank_caches) == 1
                    else torch.stack([gather_blocks(k, v, ids).to(key_cache.device) for k, v in rank_caches]))
            self._queue.put((layer, first_block, len(ids), (copy, _cuda_event(copy)), None))
        else:
            self._queue.put((layer, first_block, len(ids), list(rank_caches), ids))

    def finish(self, timeout: float | None = None) -> TransferStats:
        """Wait for the receiver's confirmation (see KVTransfer.finish)."""
        if not self._ended:
            self._ended = True
            self._queue.put(_FINISH)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel()
            raise TimeoutError(f"KV transfer {self.reservation_id!r} to {self.endpoint} did not complete "
                               f"within {timeout} s; cancelled")
        if self._error is not None:
            raise self._error
        if self._stats is None:
            raise KVTransferCancelled(f"transfer {self.reservation_id!r} was cancelled")
        return self._stats

    def cancel(self) -> None:
        """Stop sending and tell the receiver (see KVTransfer.cancel)."""
        self._ended = True
        self._cancelled.set()
        self._queue.put(_CANCEL)
        self._thread.join(1.0)
        if self._thread.is_alive():  # stuck in a send to a receiver that does not read: cut it
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass
            self._thread.join()

    def _check_layer(self, layer: int, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     ids: list[int], first_block: int) -> None:
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            self.layout.check_cache_tensor(cache, f"layer {layer} {name}")
        if value_cache.shape[0] != key_cache.shape[0]:
            raise ValueError(f"layer {layer}: K and V caches have different block counts")
        if not ids or first_block < 0 or first_block + len(ids) > self.num_blocks:
            raise ValueError(f"layer {layer}: {len(ids)} blocks at logical block {first_block} do not fit "
                             f"the reservation's {self.num_blocks} blocks")
        bad = [b for b in ids if not 0 <= b < key_cache.shape[0]]
        if bad:
            raise ValueError(f"layer {layer}: source block ids {bad[:5]} out of range [0, {key_cache.shape[0]})")

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.keepalive_s)
                except queue.Empty:  # nothing to send yet (the prompt is queued): say we are alive
                    self._raise_receiver_error()
                    self._sock.sendall(wire.encode_header(wire.KEEPALIVE, 0))
                    continue
                if item is _CANCEL or self._cancelled.is_set():
                    self._sock.sendall(wire.encode_header(wire.CANCEL, 0))
                    return
                if item is _FINISH:
                    self._finish_stream()
                    return
                self._raise_receiver_error()
                self._send_item(*item)
        except KVTransferError as exc:
            self._error = exc
        except OSError as exc:
            if not self._cancelled.is_set():
                self._error = self._receiver_error() or KVTransferError(
                    f"connection to the KV receiver {self.endpoint} lost: {exc}", code="connection_lost")
        finally:
            self._sock.close()
            if self.nixl is not None:
                self.nixl.transfer_closed()

    def _send_item(self, layer: int, first: int, count: int, data, ids: list[int] | None) -> None:
        if isinstance(data, _Ready):
            if data.computed is not None:
                data.computed.synchronize()
            self._sock.sendall(wire.encode_ready(layer, first, ids))
            self._bytes += 2 * count * self.receiver_layout.server_block_bytes  # what the receiver READs
            self._frames += 1
            return
        if ids is None:  # a copy [ranks, 2, count, ...] in the receiver's layout and its CUDA event
            copy, ready = data
            if ready is not None:
                ready.synchronize()
            views = [tensor_bytes(copy.cpu())]
        else:  # every rank's blocks in place, rank by rank: K then V
            bb = self.layout.block_bytes
            views = [view for pair in data for cache in pair for view in block_views(tensor_bytes(cache), ids, bb)]
        bb = self.receiver_layout.server_block_bytes
        send_views(self._sock, [wire.encode_layer_header(layer, first, count, bb)] + views)
        self._bytes += 2 * count * bb
        self._frames += 1

    def _finish_stream(self) -> None:
        self._sock.sendall(wire.encode_header(wire.FINISH, 0))
        frame_type, reply = read_control_frame(self._sock)
        raise_if_error(frame_type, reply)
        if frame_type != wire.COMPLETE:
            raise KVProtocolError(f"expected COMPLETE, got {wire.FRAME_NAMES[frame_type]}")
        if self.nixl is not None:  # the blocks were held until now: the bytes the receiver read are good
            if self._cancelled.is_set():
                return
            self._sock.sendall(wire.encode_header(wire.CONFIRM, 0))
        self._stats = TransferStats(self._bytes, self._frames, self.num_blocks - self.held_blocks,
                                    time.perf_counter() - self._started, self.data_path)

    def _raise_receiver_error(self) -> None:
        """The receiver speaks mid-stream only to refuse: stop at once if it did."""
        if readable(self._sock):
            error = self._receiver_error()
            raise error or KVTransferError(f"the KV receiver {self.endpoint} closed the connection",
                                           code="connection_lost")

    def _receiver_error(self) -> KVTransferError | None:
        """The ERROR frame the receiver sent before closing, if it can still be read."""
        try:
            self._sock.settimeout(1.0)
            frame_type, message = read_control_frame(self._sock)
            raise_if_error(frame_type, message)
        except KVTransferError as exc:
            return exc
        except (OSError, ValueError):
            return None
        return None
