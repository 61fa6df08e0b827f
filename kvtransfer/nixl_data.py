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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pdserve.kvtransfer.block_io import as_rank_caches
from pdserve.kvtransfer.errors import KVProtocolError
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.nixl_agent import NixlAgent, NixlCounts, memory_type
from pdserve.kvtransfer.wire import NixlOffer

log = logging.getLogger(__name__)

# How often the passive side drives UCX while it has transfers open: it is needed to set up a
# connection (and, on transports without one-sided reads, for each READ); polling more often
# takes the GIL from the engine thread (a 100 us interval slowed a CPU prefill by ~20%).
PROGRESS_INTERVAL_S = 1e-3
PEER_IDLE_S = 300.0  # a sender's agent unused this long is forgotten (it may be gone for good)
READ_LANES = 2  # the decode side's NIXL agents, each READing part of a layer on its own thread
LANE_MIN_BYTES = 1 << 20  # a smaller layer is read by one lane (a thread handoff costs ~50 us)


def cache_tensors(kv_caches: list) -> list[torch.Tensor]:
    """K of layer 0, V of layer 0, K of layer 1, ... of rank 0, then of rank 1, ...: the order of
    NixlOffer.bases (kv_caches: one rank's per-layer (K, V) pairs, or a list of them per rank)."""
    return [tensor for caches in as_rank_caches(kv_caches) for pair in caches for tensor in pair]


class NixlSendSide:
    """A prefill server's NIXL state: its agent with the whole KV cache registered, the HELLO offer
    that lets a receiver READ it, and the thread that drives UCX progress while transfers are open.

    kv_caches: per layer (K, V), each [num_blocks, block_size, heads, head_dim], contiguous; or
    such a list per tensor-parallel rank (rank 0 first)."""

    def __init__(self, agent: NixlAgent, kv_caches: list):
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
    """A decode server's NIXL state: one or more agents ("read lanes"), each with the whole KV cache
    registered once, and the READs that fill reserved blocks from a sender's cache.

    kv_caches: per layer (K, V), each [num_blocks, block_size, heads, head_dim], contiguous; or such
    a list per tensor-parallel rank (then `layout` is the server's, KVLayout.of_ranks): each rank's
    cache READs exactly its heads, from whichever of the sender's ranks hold them (KVLayout.head_map).
    agents: one per lane. A layer of at least LANE_MIN_BYTES is split across the lanes by bytes,
    each lane READing its part on its own thread: where the CPU moves the bytes (CMA on one host)
    two lanes copy on two cores, as the TCP backend's sender and receiver do (256 MiB on this
    2-core machine: 4.4-5.2 GB/s with one lane, 5.9-7.3 GB/s with two); the CPU time is the same."""

    def __init__(self, agents: list[NixlAgent] | NixlAgent, layout: KVLayout,
                 kv_caches: list, read_timeout_s: float = 30.0):
        self.agents = [agents] if isinstance(agents, NixlAgent) else list(agents)
        if not self.agents:
            raise ValueError("NixlReceiveSide needs at least one agent")
        self.layout = layout
        self.read_timeout_s = read_timeout_s
        rank_caches = as_rank_caches(kv_caches)
        layout.check_rank_caches(rank_caches)
        self.memory, device = memory_type(rank_caches[0][0][0].device)
        self._bases = np.array([[[k.data_ptr(), v.data_ptr()] for k, v in caches] for caches in rank_caches],
                               dtype=np.uint64)  # [rank, layer, half]
        self._device = device
        self._registrations = [agent.register(cache_tensors(kv_caches)) for agent in self.agents]
        self._lanes = (ThreadPoolExecutor(len(self.agents) - 1, thread_name_prefix="nixl-lane")
                       if len(self.agents) > 1 else None)
        self._users: dict[str, int] = {}  # peer -> sessions using it now
        self._idle_since: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def agent(self) -> NixlAgent:
        """The first lane's agent (its name identifies this server in logs)."""
        return self.agents[0]

    def counts(self) -> NixlCounts:
        """Registrations, READs in flight and remote agents summed over the lanes."""
        per_lane = [agent.counts() for agent in self.agents]
        return NixlCounts(sum(c.registrations for c in per_lane), sum(c.transfers_in_flight for c in per_lane),
                          sum(c.remote_agents for c in per_lane))

    def accept(self, offer: NixlOffer) -> str:
        """Make the offering sender's agent known (to every lane) for one session (release() when
        it ends); returns its name as NIXL knows it. Peers idle for PEER_IDLE_S are forgotten here."""
        with self._lock:
            self._forget_idle(time.monotonic() - PEER_IDLE_S)
            names = {agent.add_peer(offer.metadata) for agent in self.agents}
            if names != {offer.agent}:
                for name in names - set(self._users):
                    self._forget(name)
                raise KVProtocolError(f"the sender's NIXL metadata names agent {sorted(names)[0]!r}, its HELLO says "
                                      f"{offer.agent!r}")
            self._users[offer.agent] = self._users.get(offer.agent, 0) + 1
            self._idle_since.pop(offer.agent, None)
        return offer.agent

    def release(self, peer: str, failed: bool) -> None:
        """A session using `peer` ended; after a failed READ the peer is forgotten once unused (it
        may have died: a restarted one comes back with new metadata)."""
        with self._lock:
            self._users[peer] -= 1
            if self._users[peer]:
                return
            del self._users[peer]
            if failed:
                self._forget(peer)
            else:
                self._idle_since[peer] = time.monotonic()

    def _forget(self, peer: str) -> None:
        for agent in self.agents:
            agent.forget_peer(peer)

    def _forget_idle(self, before: float) -> None:
        for peer, since in list(self._idle_since.items()):
            if since < before:
                del self._idle_since[peer]
                self._forget(peer)

    def read_layer(self, peer: str, offer: NixlOffer, sender: KVLayout, layer: int, src_block_ids: list[int],
                   dst_block_ids: list[int]) -> None:
        """READ the sender's blocks src_block_ids of `layer` (K and V; `sender` is its layout) into our
        blocks dst_block_ids, pairwise, each of our ranks its own heads; returns when every lane's part
        is in (or failed: the first error is raised only after every lane stopped writing).
        KVProtocolError for a source block outside the sender's cache (nothing is read then)."""
        src = np.asarray(src_block_ids, dtype=np.int64)
        if src.size and (src.min() < 0 or src.max() >= offer.num_blocks):
            raise KVProtocolError(f"READY names source blocks outside the sender's {offer.num_blocks}")
        local, remote = self._descriptors(offer, sender, layer, src, np.asarray(dst_block_ids, dtype=np.int64))
        parts = _split_by_bytes(local[:, 1], len(self.agents) if int(local[:, 1].sum()) >= LANE_MIN_BYTES else 1)
        futures = [self._lanes.submit(self._read_part, lane, peer, offer, local[part], remote[part])
                   for lane, part in enumerate(parts[1:], start=1)]
        errors = []
        try:
            self._read_part(0, peer, offer, local[parts[0]], remote[parts[0]])
        except Exception as exc:
            errors.append(exc)
        for future in futures:
            try:
                future.result()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _read_part(self, lane: int, peer: str, offer: NixlOffer, local: np.ndarray, remote: np.ndarray) -> None:
        self.agents[lane].read(local, self.memory, remote, offer.memory, peer, self.read_timeout_s)

    def _descriptors(self, offer: NixlOffer, sender: KVLayout, layer: int, src: np.ndarray, dst: np.ndarray):
        """(local, remote) uint64 [n, 3] rows of (address, bytes, device). Where a rank of ours takes a
        whole rank's heads from the sender, one row per run of blocks consecutive on both sides;
        where the heads are cut (different tensor-parallel sizes), one row per token of each block
        (the heads of a token are contiguous in a [block_size, heads, head_dim] block, tokens are not)."""
        ours = self.layout
        head_bytes = ours.block_bytes // (ours.block_size * ours.heads_per_rank)
        local_rows, remote_rows = [], []
        for slices in sender.head_map(ours):
            for piece in slices:
                whole = piece.count == sender.heads_per_rank == ours.heads_per_rank
                for half in range(2):
                    local_base = self._bases[piece.dst_rank, layer, half]
                    remote_base = np.uint64(offer.bases[(piece.src_rank * sender.num_layers + layer) * 2 + half])
                    if whole:
                        rows = _block_runs(local_base, remote_base, src, dst, ours.block_bytes)
                    else:
                        rows = _token_rows(local_base + np.uint64(piece.dst_head * head_bytes),
                                           remote_base + np.uint64(piece.src_head * head_bytes), src, dst,
                                           ours, sender, piece.count * head_bytes)
                    local_rows.append(rows[0])
                    remote_rows.append(rows[1])
        local, remote = np.concatenate(local_rows), np.concatenate(remote_rows)
        local[:, 2], remote[:, 2] = self._device, offer.device
        return local, remote

    def close(self) -> None:
        """Deregister the cache and release the agents and the lane threads."""
        if self._lanes is not None:
            self._lanes.shutdown(wait=True)
        for agent, registration in zip(self.agents, self._registrations):
            agent.deregister(registration)
            agent.close()


def _block_runs(local_base, remote_base, src: np.ndarray, dst: np.ndarray, block_bytes: int):
    """(local, remote) [runs, 3] rows: one per run of blocks consecutive on both sides."""
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [src.size]])).astype(np.uint64)
    bb = np.uint64(block_bytes)
    local = np.zeros((len(starts), 3), dtype=np.uint64)
    remote = np.zeros_like(local)
    local[:, 0] = local_base + dst[starts].astype(np.uint64) * bb
    remote[:, 0] = remote_base + src[starts].astype(np.uint64) * bb
    local[:, 1] = remote[:, 1] = lengths * bb
    return local, remote


def _token_rows(local_base, remote_base, src: np.ndarray, dst: np.ndarray, ours: KVLayout, sender: KVLayout,
                length: int):
    """(local, remote) [blocks * block_size, 3] rows: one per token of each block pair, `length`
    bytes from each base (the bases already point at the first head moved)."""
    tokens = np.arange(ours.block_size, dtype=np.uint64)
    local_row, remote_row = ours.block_bytes // ours.block_size, sender.block_bytes // sender.block_size
    local = np.zeros((src.size * ours.block_size, 3), dtype=np.uint64)
    remote = np.zeros_like(local)
    local[:, 0] = (local_base + dst.astype(np.uint64)[:, None] * np.uint64(ours.block_bytes)
                   + tokens[None, :] * np.uint64(local_row)).reshape(-1)
    remote[:, 0] = (remote_base + src.astype(np.uint64)[:, None] * np.uint64(sender.block_bytes)
                    + tokens[None, :] * np.uint64(remote_row)).reshape(-1)
    local[:, 1] = remote[:, 1] = length
    return local, remote


def _split_by_bytes(sizes: np.ndarray, lanes: int) -> list[slice]:
    """Contiguous row ranges, one per lane (fewer when there are fewer rows), of about equal bytes."""
    lanes = max(1, min(lanes, len(sizes)))
    ends = np.cumsum(sizes.astype(np.float64))
    cuts = [int(np.searchsorted(ends, ends[-1] * k / lanes, side="left")) + 1 for k in range(1, lanes)]
    bounds = sorted(set([0, *[min(c, len(sizes)) for c in cuts], len(sizes)]))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
