"""The decode side of the TCP backend: a listening server that writes incoming KV into reserved blocks."""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.backend import KVReceiverBackend, TransferObserver
from pdserve.kvtransfer.block_io import CacheBlocks, as_rank_caches
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.nixl_data import NixlReceiveSide
from pdserve.kvtransfer.receive_session import ReceiveSession
from pdserve.kvtransfer.reservations import OnComplete, ReservationTable
from pdserve.kvtransfer.sockio import configure_socket

log = logging.getLogger(__name__)


class TCPKVReceiver(KVReceiverBackend):
    """Listens on (host, port) and fills reservations registered with `expect`.

    kv_caches: per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim], the decode
    engine's cache (written in place); for a tensor-parallel server, such a list per rank (rank 0
    first) and its layout (KVLayout.of_ranks): each rank's cache receives exactly its own heads.
    One thread accepts, one thread serves each connection; the
    on_complete callbacks run on those threads (an asyncio caller hops into its loop with
    loop.call_soon_threadsafe). ssl_context: a server-side context to speak TLS (mTLS if it requires
    client certificates); auth_token: a shared secret every sender must present in its handshake;
    observer: called (on a connection thread) with a ReceivedTransfer for every transfer that ends.
    nixl: this server's NIXL side (the cache registered with it): senders that offer their
    cache are then READ from instead of sending LAYER frames; require_nixl refuses the others.
    stop() closes it.
    """

    def __init__(self, kv_caches: list, layout: KVLayout | None = None,
                 host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 auth_token: str | None = None, max_connections: int = 256,
                 handshake_timeout_s: float = 10.0, idle_timeout_s: float | None = None,
                 socket_buffer_bytes: int | None = None, zero_copy: bool | None = None,
                 observer: TransferObserver | None = None, nixl: NixlReceiveSide | None = None,
                 require_nixl: bool = False):
        if require_nixl and nixl is None:
            raise ValueError("require_nixl needs a NIXL side")
        self.nixl = nixl
        self.require_nixl = require_nixl
        self.rank_kv_caches = as_rank_caches(kv_caches)
        self.layout = layout or KVLayout.from_kv_caches(self.rank_kv_caches[0])
        num_blocks = self.layout.check_rank_caches(self.rank_kv_caches)
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.auth_token = auth_token
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.socket_buffer_bytes = socket_buffer_bytes
        self.zero_copy = zero_copy
        self.reservations = ReservationTable(self.layout, num_blocks, observer)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._sessions: dict[threading.Thread, ReceiveSession] = {}
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def endpoint(self) -> str:
        """'host:port' the server listens on (after start)."""
        if self._listener is None:
            raise RuntimeError("the receiver is not started")
        host, port = self._listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> str:
        """Bind, listen and start accepting; returns the endpoint."""
        if self._listener is not None:
            raise RuntimeError("the receiver is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)
        self._accept_thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop accepting, fail pending reservations (on_complete gets KVTransferCancelled), close
        every connection and wait for the threads."""
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
        self.reservations.fail_all("the KV receiver is stopping")
        with self._lock:
            sessions = dict(self._sessions)
        for thread, session in sessions.items():
            session.abort("shutting_down", "the KV receiver is stopping")
            thread.join()
        if self.nixl is not None:
            self.nixl.close()

    def expect(self, reservation_id: str, dst_block_ids: list[int], num_tokens: int,
               on_complete: OnComplete, held_blocks: int = 0) -> None:
        """Register reserved blocks for a prompt of num_tokens tokens (the first
        ceil(num_tokens / block_size) of dst_block_ids receive its KV, less the first held_blocks,
        which hold it already and are never written). on_complete(reservation_id, error) is called
        exactly once -- error None when the whole KV is in the blocks -- unless
        cancel(reservation_id) comes first."""
        self.reservations.add(reservation_id, dst_block_ids, num_tokens, on_complete, held_blocks)

    def cancel(self, reservation_id: str) -> bool:
        """Forget a reservation (expired, aborted). When this returns no byte more lands in its blocks,
        and on_complete is not called. False if it was not registered any more."""
        return self.reservations.cancel(reservation_id)

    def has_sender(self, reservation_id: str) -> bool:
        """True while a sender's connection is bound to the reservation and open: a dead sender
        closes it (EOF, a reset, or the sockets' keepalive probes for a vanished host)."""
        return self.reservations.has_sender(reservation_id)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                log.exception("KV receiver accept failed")
                continue
            self._start_session(conn, addr)

    def _start_session(self, conn: socket.socket, addr) -> None:
        with self._lock:
            for thread in [t for t in self._sessions if not t.is_alive()]:
                del self._sessions[thread]
            if len(self._sessions) >= self.max_connections:
                try:
                    conn.sendall(wire.error_frame("busy", f"too many KV connections ({self.max_connections})"))
                except OSError:
                    pass
                conn.close()
                return
            configure_socket(conn, self.socket_buffer_bytes)
            session = ReceiveSession(conn, f"{addr[0]}:{addr[1]}", self.layout, self.reservations,
                                     CacheBlocks(self.rank_kv_caches, self.layout.block_bytes, self.zero_copy),
                                     self.auth_token, self.handshake_timeout_s, self.idle_timeout_s,
                                     self.ssl_context, self.nixl, self.require_nixl)
            thread = threading.Thread(target=session.run, name=f"kv-recv-{addr[1]}", daemon=True)
            self._sessions[thread] = session
            thread.start()
