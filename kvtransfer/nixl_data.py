"""The NIXL data path of a KV transfer: the decode side READs each layer's blocks straight from
the prefill server's KV cache into its own reserved blocks. Both servers register their whole
cache with NIXL once, at start; no byte is copied on either side beyond the READ itself.

The control stays on the TCP backend's connection (HELLO with auth token, optionally TLS; READY
frames naming the layer's source blocks; COMPLETE; CANCEL; liveness), so failure handling is the
TCP backend's. Only the K/V bytes move through NIXL.

Why pull (the decode side reads), not push:
- Only the decode side ever writes into its cache, between begin_write and end_write, as with TCP:
  a cancelled reservation's blocks can be handed to another request the moment cancel() returns.
  With push, a prefill server's WRITE already posted could still land in blocks reused since.
- The decode side never hands out its NIXL metadata, so no peer holds keys to write its memory.
- Measured on one host (2 cores, UCX defaults, 1 MiB layer of 128 blocks): READ 0.37-0.48 ms,
  WRITE 0.35 ms; 16-256 MiB READs 4.5-6 GB/s.

The prefill server keeps the source blocks unchanged (pinned in its block pool) from the layer
that computed them until the transfer ends: the receiver's COMPLETE answered with CONFIRM, a
cancel, or the connection lost. The receiver reports success only after CONFIRM, so it never keeps
bytes read from blocks the sender had already released (the sender's lease on them is the
transfer's timeout).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from pdserve.kvtransfer.errors import KVProtocolError
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.nixl_agent import NixlAgent, memory_type
from pdserve.kvtransfer.wire import NixlOffer

log = logging.getLogger(__name__)

# How often the passive side drives UCX while it has transfers open: it is needed to set up a
# connection (and, on transports without one-sided reads, for each READ); polling more often
# takes the GIL from the engine thread (a 100 us interval slowed a CPU prefill by ~20%).
PROGRESS_INTERVAL_S = 1e-3
PEER_IDLE_S = 300.0  # a sender's agent unused this long is forgotten (it may be gone for good)


def cache_tensors(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """K of layer 0, V of layer 0, K of layer 1, ...: the order of NixlOffer.bases."""
    return [tensor for pair in kv_caches for tensor in pair]


class NixlSendSide:
    """A prefill server's NIXL state: its agent with the whole KV cache registered, the HELLO offer
    that lets a receiver READ it, and the thread that drives UCX progress while transfers are open.

    kv_caches: per layer (K, V), each [num_blocks, block_size, heads, head_dim], contiguous."""

    def __init__(self, agent: NixlAgent, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.agent = agent
        tensors = cache_tensors(kv_caches)
        self._registration = agent.register(tensors)
        memory, device = memory_type(tensors[0].device)
        self.offer = NixlOffer(agent.name, agent.metadata, memory, device, int(tensors[0].shape[0]),
                               tuple(t.data_ptr() for t in tensors))
        self.open_transfers = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._progress_loop, name="nixl-progress", daemon=True)
        self._thread.start()

    def transfer_opened(self) -> None:
        """A transfer offers the cache: drive progress until it is closed."""
        with self._cond:
            self.open_transfers += 1
            self._cond.notify_all()

    def transfer_closed(self) -> None:
        """The transfer ended (confirmed, cancelled or its connection lost)."""
        with self._cond:
            self.open_transfers -= 1

    def close(self) -> None:
        """Stop the progress thread and release the registration and the agent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.agent.deregister(self._registration)
        self.agent.close()

    def _progress_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.open_transfers > 0 or self._closed)
                if self._closed:
                    return
            try:
                self.agent.progress()
            except Exception as exc:
                log.warning("NIXL progress failed: %s", exc)
            with self._cond:  # until the next poll, or until woken by close
                self._cond.wait(PROGRESS_INTERVAL_S)


class NixlReceiveSide:
    """A decode server's NIXL state: its agent with the whole KV cache registered once, and the
    READs that fill reserved blocks from a sender's cache.

    kv_caches: per layer (K, V), each [num_blocks, block_size, heads, head_dim], contiguous."""

    def __init__(self, agent: NixlAgent, layout: KVLayout, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 read_timeout_s: float = 30.0):
        self.agent = agent
        self.layout = layout
        self.read_timeout_s = read_timeout_s
        self.memory, device = memory_type(kv_caches[0][0].device)
        self._bases = np.array([[k.data_ptr(), v.data_ptr()] for k, v in kv_caches], dtype=np.uint64)
        self._device = device
        self._registration = agent.register(cache_tensors(kv_caches))
        self._users: dict[str, int] = {}  # peer -> sessions using it now
        self._idle_since: dict[str, float] = {}
        self._lock = threading.Lock()

    def accept(self, offer: NixlOffer) -> str:
        """Make the offering sender's agent known for one session (release() when it ends);
        returns its name as NIXL knows it. Peers idle for PEER_IDLE_S are forgotten here."""
        with self._lock:
            self._forget_idle(time.monotonic() - PEER_IDLE_S)
            name = self.agent.add_peer(offer.metadata)
            if name != offer.agent:
                if not self._users.get(name):
                    self.agent.forget_peer(name)
                raise KVProtocolError(f"the sender's NIXL metadata names agent {name!r}, its HELLO says "
                                      f"{offer.agent!r}")
            self._users[name] = self._users.get(name, 0) + 1
            self._idle_since.pop(name, None)
        return name

    def release(self, peer: str, failed: bool) -> None:
        """A session using `peer` ended; after a failed READ the peer is forgotten once unused (it
        may have died: a restarted one comes back with new metadata)."""
        with self._lock:
            self._users[peer] -= 1
            if self._users[peer]:
                return
            del self._users[peer]
            if failed:
                self.agent.forget_peer(peer)
            else:
                self._idle_since[peer] = time.monotonic()

    def _forget_idle(self, before: float) -> None:
        for peer, since in list(self._idle_since.items()):
            if since < before:
                del self._idle_since[peer]
                self.agent.forget_peer(peer)

    def read_layer(self, peer: str, offer: NixlOffer, layer: int, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> None:
        """READ the sender's blocks src_block_ids of `layer` (K and V) into our blocks dst_block_ids,
        pairwise; returns when they are in. KVProtocolError for a source block outside the
        sender's cache (nothing is read then)."""
        src = np.asarray(src_block_ids, dtype=np.int64)
        if src.size and (src.min() < 0 or src.max() >= offer.num_blocks):
            raise KVProtocolError(f"READY names source blocks outside the sender's {offer.num_blocks}")
        dst = np.asarray(dst_block_ids, dtype=np.int64)
        # One descriptor per run that is consecutive on both sides.
        breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        lengths = np.diff(np.concatenate([starts, [src.size]])).astype(np.uint64)
        bb = np.uint64(self.layout.block_bytes)
        runs = len(starts)
        local = np.zeros((2 * runs, 3), dtype=np.uint64)
        remote = np.zeros_like(local)
        for half in range(2):
            rows = slice(half * runs, (half + 1) * runs)
            local[rows, 0] = self._bases[layer, half] + dst[starts].astype(np.uint64) * bb
            remote[rows, 0] = np.uint64(offer.bases[2 * layer + half]) + src[starts].astype(np.uint64) * bb
            local[rows, 1] = remote[rows, 1] = lengths * bb
        local[:, 2], remote[:, 2] = self._device, offer.device
        self.agent.read(local, self.memory, remote, offer.memory, peer, self.read_timeout_s)

    def close(self) -> None:
        """Deregister the cache and release the agent."""
        self.agent.deregister(self._registration)
        self.agent.close()
