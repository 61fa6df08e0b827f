"""Socket helpers: exact reads, scatter/gather I/O over many buffers, socket options."""

from __future__ import annotations

import select
import socket
import ssl

# Buffers per recvmsg_into/sendmsg call: enough to cover a socket buffer's worth of blocks while
# keeping the per-call slice of the buffer list cheap.
_WINDOW = 64


class PeerClosed(ConnectionError):
    """The peer closed the connection (EOF) before a complete frame arrived."""


def configure_socket(sock: socket.socket, buffer_bytes: int | None = None) -> None:
    """TCP_NODELAY (frames go out at once), keepalive probes (a peer host that vanishes without a
    FIN or RST is noticed within about a minute) and, if given, explicit send/receive buffer sizes.
    Without buffer_bytes, Linux autotunes the buffers, which is usually fastest."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes; PeerClosed on EOF before that."""
    buf = bytearray(size)
    recv_into_views(sock, [memoryview(buf)])
    return bytes(buf)


def recv_into_views(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill every buffer in `views`, in order, from the socket (scatter read); PeerClosed on EOF."""
    views = [v for v in views if v.nbytes]
    scatter = not isinstance(sock, ssl.SSLSocket) and hasattr(sock, "recvmsg_into")
    i = 0
    while i < len(views):
        if scatter:  # MSG_WAITALL: one call fills the whole window (fewer, larger reads)
            got = sock.recvmsg_into(views[i:i + _WINDOW], 0, socket.MSG_WAITALL)[0]
        else:
            got = sock.recv_into(views[i])
        if got == 0:
            raise PeerClosed("connection closed by the peer in the middle of a frame")
        i = _advance(views, i, got)


def send_views(sock: socket.socket, views: list[memoryview | bytes]) -> None:
    """Send every buffer in `views`, in order (gather write)."""
    views = [memoryview(v).cast("B") for v in views if len(v)]
    if isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "sendmsg"):
        for view in views:
            sock.sendall(view)
        return
    i = 0
    while i < len(views):
        i = _advance(views, i, sock.sendmsg(views[i:i + _WINDOW]))


def _advance(views: list[memoryview], i: int, done: int) -> int:
    """Drop `done` bytes from the front of views[i:]; returns the index of the first unfinished one."""
    while done:
        size = views[i].nbytes
        if done >= size:
            done -= size
            i += 1
        else:
            views[i] = views[i][done:]
            done = 0
    return i


def readable(sock: socket.socket) -> bool:
    """Whether a read would not block now (data, EOF or an error is waiting)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))
