"""Byte views over blocks of paged KV cache tensors, for zero-copy socket I/O.

A cache tensor is [num_blocks, block_size, heads, head_dim] and contiguous, so block b is the byte
range [b * block_bytes, (b + 1) * block_bytes) of its storage; runs of consecutive block ids become
one view each.
"""

from __future__ import annotations

import torch


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Consecutive ids merged: [4, 5, 6, 9] -> [(4, 3), (9, 1)] as (first id, count)."""
    runs: list[tuple[int, int]] = []
    for block in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat writable byte view of a contiguous CPU tensor's memory (any dtype, bf16 and fp8 too)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    return memoryview(tensor.detach().view(torch.uint8).reshape(-1).numpy())


def block_views(flat: memoryview, block_ids: list[int], block_bytes: int) -> list[memoryview]:
    """Views of the given blocks of a flat cache view, in block_ids order (runs merged)."""
    return [flat[start * block_bytes:(start + count) * block_bytes] for start, count in block_runs(block_ids)]


def as_rank_caches(kv_caches) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A server's caches per rank: kv_caches is either one rank's list of per-layer (K, V) pairs or
    already a list of them per tensor-parallel rank."""
    if kv_caches and isinstance(kv_caches[0], list):
        return kv_caches
    return [kv_caches]


class CacheBlocks:
    """Byte access to the blocks of every rank's, every layer's K and V cache (the receiving side).

    rank_kv_caches: per tensor-parallel rank, per layer (K, V), each [num_blocks, block_size, heads,
    head_dim]; block_bytes: one block of one rank's K (or V). A LAYER payload holds, rank by rank, that
    rank's K blocks then its V blocks. CPU caches are read and written in place; caches on another
    device go through a CPU staging copy.
    """

    def __init__(self, rank_kv_caches: list[list[tuple[torch.Tensor, torch.Tensor]]], block_bytes: int,
                 zero_copy: bool | None = None):
        self.rank_kv_caches = as_rank_caches(rank_kv_caches)
        self.block_bytes = block_bytes
        first = self.rank_kv_caches[0][0][0]
        self.num_blocks = first.shape[0]
        on_cpu = first.device.type == "cpu"
        self.zero_copy = on_cpu if zero_copy is None else (zero_copy and on_cpu)
        self._flat = ([[(tensor_bytes(k), tensor_bytes(v)) for k, v in caches] for caches in self.rank_kv_caches]
                      if self.zero_copy else None)
        self._staging: torch.Tensor | None = None

    def write_views(self, layer: int, block_ids: list[int]) -> list[memoryview]:
        """Buffers a LAYER payload is received into. With zero_copy they are the cache blocks
        themselves; otherwise a staging buffer that `commit` copies into the caches."""
        if self._flat is not None:
            return [view for ranks in self._flat for half in ranks[layer]
                    for view in block_views(half, block_ids, self.block_bytes)]
        size = 2 * len(self.rank_kv_caches) * len(block_ids) * self.block_bytes
        if self._staging is None or self._staging.numel() < size:
            device = self.rank_kv_caches[0][0][0].device
            self._staging = torch.empty(size, dtype=torch.uint8,
                                        pin_memory=torch.cuda.is_available() and device.type == "cuda")
        return [tensor_bytes(self._staging)[:size]]

    def commit(self, layer: int, block_ids: list[int]) -> None:
        """Copy a staged LAYER payload into the caches (no-op with zero_copy)."""
        if self._flat is not None:
            return
        count, ranks = len(block_ids), len(self.rank_kv_caches)
        staged = _as_rows(self._staging[:2 * ranks * count * self.block_bytes].view(2 * ranks * count,
                                                                                   self.block_bytes))
        devices = set()
        for caches, rank_part in zip(self.rank_kv_caches, staged.view(ranks, 2, count, -1)):
            key_cache = caches[layer][0]
            index = torch.tensor(block_ids, dtype=torch.int64, device=key_cache.device)
            for half, cache in zip(rank_part, caches[layer]):
                _as_rows(cache).index_copy_(0, index, half.to(cache.device, non_blocking=True))
            devices.add(key_cache.device)
        for device in devices:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the staging buffer is reused


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous [N, ...] tensor as [N, words] of the widest integer type dividing a row's bytes
    (index ops on 8-byte words are several times faster than on single bytes)."""
    rows = tensor.reshape(tensor.shape[0], -1).view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        if rows.shape[1] % dtype.itemsize == 0:
            return rows.view(dtype)
    return rows


def gather_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """A copy of the given blocks of K and V as one tensor [2, len(block_ids), words] of integer words
    (byte-exact), on the caches' device: on a GPU one cheap gather; the sender thread then moves it
    to the CPU."""
    index = torch.tensor(block_ids, dtype=torch.int64, device=key_cache.device)
    key_rows, value_rows = _as_rows(key_cache), _as_rows(value_cache)
    out = torch.empty(2, len(block_ids), key_rows.shape[1], dtype=key_rows.dtype, device=key_cache.device)
    torch.index_select(key_rows, 0, index, out=out[0])
    torch.index_select(value_rows, 0, index, out=out[1])
    return out
