"""The NIXL data path of a KV transfer: the decode side READs each layer's blocks from the prefill
server's registered staging memory straight into its reserved cache blocks.

The control stays on the TCP backend's connection (HELLO with auth token, optionally TLS; frames
saying which layer is ready; COMPLETE; CANCEL; liveness), so failure handling is the TCP backend's.
Only the K/V bytes move through NIXL.

Why pull (the decode side reads), not push:
- Only the decode side ever writes into its cache, between begin_write and end_write, as with TCP:
  a cancelled reservation's blocks can be handed to another request the moment cancel() returns.
  With push, a prefill server's WRITE already posted could still land in blocks reused since.
- The decode side never hands out its NIXL metadata, so no peer holds keys to its memory at all.
- Measured on one host (2 cores, UCX defaults, 1 MiB layer of 128 blocks): READ 0.37-0.48 ms,
  WRITE 0.35 ms; 16-256 MiB READs 4.5-6 GB/s.

The sender copies each layer's blocks into a region of its staging pool as the layer is computed
(the copy the TCP backend makes anyway: a prefill server frees a prompt's blocks at its first
token), and keeps the region until the receiver's COMPLETE is answered with CONFIRM, or the
connection ends: the receiver reports success only after CONFIRM, so it never keeps bytes read from
a region the sender had already given up (its lease is the transfer's timeout).

Region layout, for a transfer of nb blocks: layer i's K blocks at offset (2i) * nb * block_bytes,
its V blocks at (2i + 1) * nb * block_bytes, logical block j at j * block_bytes within each.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from pdserve.kvtransfer.block_io import as_word_rows, block_runs
from pdserve.kvtransfer.errors import KVProtocolError
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.nixl_agent import NixlAgent, memory_type
from pdserve.kvtransfer.wire import NixlOffer

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 100e-6  # how often the passive side drives UCX while it has transfers open
PEER_IDLE_S = 300.0  # a sender's agent unused this long is forgotten (it may be gone for good)
_ALIGN = 4096


class StagingRegion:
    """A transfer's part of the staging pool: [num_layers, 2, num_blocks, block words] of integer
    words (see the module docstring for the byte layout)."""

    def __init__(self, pool: StagingPool, offset: int, num_blocks: int):
        self.pool = pool
        self.offset = offset
        self.num_blocks = num_blocks
        layout = pool.layout
        self.nbytes = 2 * layout.num_layers * num_blocks * layout.block_bytes
        flat = pool.buffer[offset:offset + self.nbytes]
        self.rows = as_word_rows(flat.view(2 * layout.num_layers * num_blocks, layout.block_bytes))
        self.rows = self.rows.view(layout.num_layers, 2, num_blocks, -1)

    @property
    def address(self) -> int:
        """The region's first byte, as the receiver addresses it."""
        return self.pool.buffer.data_ptr() + self.offset

    def stage_layer(self, layer: int, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    src_block_ids: list[int], first_block: int) -> None:
        """Copy src_block_ids of the layer's K and V caches (each [NB, block_size, heads, head_dim])
        into logical blocks first_block, ... of the region (on the caches' device; not synchronized)."""
        index = torch.tensor(src_block_ids, dtype=torch.int64, device=key_cache.device)
        end = first_block + len(src_block_ids)
        for half, cache in enumerate((key_cache, value_cache)):
            torch.index_select(as_word_rows(cache), 0, index, out=self.rows[layer, half, first_block:end])


class StagingPool:
    """Registered memory that transfers' regions are carved from (first fit, coalescing frees).

    nbytes on `device` (CPU memory, or GPU memory for a GPU cache), registered with `agent` once."""

    def __init__(self, agent: NixlAgent, layout: KVLayout, nbytes: int, device: torch.device):
        self.agent = agent
        self.layout = layout
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.memory, self.device = memory_type(device)
        self._registration = agent.register(self.buffer)
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def allocate(self, num_blocks: int) -> StagingRegion | None:
        """A region for a transfer of num_blocks blocks per layer, or None when no free run fits."""
        size = 2 * self.layout.num_layers * num_blocks * self.layout.block_bytes
        rounded = -(-size // _ALIGN) * _ALIGN
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= rounded:
                    self._free[i:i + 1] = [(offset + rounded, free - rounded)] if free > rounded else []
                    self._used[offset] = rounded
                    break
            else:
                return None
        return StagingRegion(self, offset, num_blocks)

    def free(self, region: StagingRegion) -> bool:
        """Return a region's bytes; False (and nothing done) when it was freed already."""
        with self._lock:
            size = self._used.pop(region.offset, None)
            if size is None:
                return False
            runs = sorted(self._free + [(region.offset, size)])
            merged: list[tuple[int, int]] = []
            for offset, length in runs:
                if merged and merged[-1][0] + merged[-1][1] == offset:
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((offset, length))
            self._free = merged
        return True

    @property
    def regions_in_use(self) -> int:
        """Regions allocated and not freed."""
        with self._lock:
            return len(self._used)

    def close(self) -> None:
        """Deregister the pool's memory."""
        self.agent.deregister(self._registration)


class NixlSendSide:
    """A prefill server's NIXL state: its agent, its registered staging pool, and the thread that
    drives UCX progress while any region is handed out (the receivers READ from it).

    layout: the prefill cache's layout; staging_bytes: the pool's size; device: the cache's device."""

    def __init__(self, agent: NixlAgent, layout: KVLayout, staging_bytes: int, device: torch.device):
        self.agent = agent
        self.pool = StagingPool(agent, layout, staging_bytes, device)
        self._metadata = agent.metadata  # after the pool's registration: it carries the memory keys
        self._open = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._progress_loop, name="nixl-progress", daemon=True)
        self._thread.start()

    def open_region(self, num_blocks: int) -> tuple[StagingRegion, NixlOffer] | None:
        """A staging region for a transfer and the HELLO offer that points at it; None when the
        pool is full (the transfer then moves over TCP, or fails where NIXL is required)."""
        region = self.pool.allocate(num_blocks)
        if region is None:
            return None
        with self._cond:
            self._open += 1
            self._cond.notify_all()
        return region, NixlOffer(self.agent.name, self._metadata, region.address, self.pool.memory,
                                 self.pool.device)

    def close_region(self, region: StagingRegion) -> None:
        """The transfer using region ended (confirmed, cancelled or its connection lost)."""
        if self.pool.free(region):
            with self._cond:
                self._open -= 1

    def close(self) -> None:
        """Stop the progress thread and release the pool and the agent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.pool.close()
        self.agent.close()

    def _progress_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._open > 0 or self._closed)
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
    READs that fill reserved blocks from a sender's staging region.

    kv_caches: per layer (K, V), each [num_blocks, block_size, heads, head_dim], contiguous."""

    def __init__(self, agent: NixlAgent, layout: KVLayout, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 read_timeout_s: float = 30.0):
        self.agent = agent
        self.layout = layout
        self.read_timeout_s = read_timeout_s
        self.memory, device = memory_type(kv_caches[0][0].device)
        self._bases = np.array([[k.data_ptr(), v.data_ptr()] for k, v in kv_caches], dtype=np.uint64)
        self._device = device
        self._registration = agent.register([t for pair in kv_caches for t in pair])
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

    def read_layer(self, peer: str, offer: NixlOffer, num_blocks: int, layer: int, first_block: int,
                   dst_block_ids: list[int]) -> None:
        """READ logical blocks first_block, ... of `layer` (K and V) from the sender's region
        (num_blocks blocks per layer) into our blocks dst_block_ids; returns when they are in."""
        bb = self.layout.block_bytes
        runs = block_runs(dst_block_ids)
        local = np.zeros((2 * len(runs), 3), dtype=np.uint64)
        remote = np.zeros_like(local)
        starts = np.array([s for s, _ in runs], dtype=np.uint64)
        counts = np.array([c for _, c in runs], dtype=np.uint64)
        logical = first_block + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.uint64)
        for half in range(2):
            rows = slice(half * len(runs), (half + 1) * len(runs))
            local[rows, 0] = self._bases[layer, half] + starts * bb
            remote[rows, 0] = (offer.address + (2 * layer + half) * num_blocks * bb) + logical * bb
            local[rows, 1] = remote[rows, 1] = counts * bb
        local[:, 2], remote[:, 2] = self._device, offer.device
        self.agent.read(local, self.memory, remote, offer.memory, peer, self.read_timeout_s)

    def close(self) -> None:
        """Deregister the cache and release the agent."""
        self.agent.deregister(self._registration)
        self.agent.close()
