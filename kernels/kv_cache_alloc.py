"""Allocation of one layer's K (or V) paged cache, float or quantized.

A float cache is a plain [NB, BS, KVH, D] tensor. A quantized (int8/fp8) cache packs each block
with its own scales: block b is one run of bytes, its BS * KVH * D values, then KVH float32
scales, then padding. The tensor that is allocated (and that the KV transfer and copy-on-write
move, so a block never travels without its scales) is that byte run per block, shaped
[NB, BS, 1, row_bytes] so that the KV transfer's layout keeps `block_size` tokens per block;
the kernels read it through two views:
    data   [NB, BS, KVH, D]  (int8 / float8_e4m3fn, block stride = the packed block size)
    scales [NB, KVH] float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.kernels.kv_quant import is_quantized

ALIGN = 16  # bytes: each packed block starts 16-byte aligned, for vector loads on the GPU


@dataclass
class CacheTensors:
    """One layer's K (or V) cache: `storage` is what is allocated and moved (the packed blocks of
    a quantized cache, or the float cache itself); `data` [NB, BS, KVH, D] and `scales` [NB, KVH]
    (None for a float cache) are views the kernels take."""

    storage: torch.Tensor
    data: torch.Tensor
    scales: torch.Tensor | None

    def __repr__(self) -> str:  # shapes only: printing a multi-GiB cache would read all of it
        scales = "None" if self.scales is None else f"{tuple(self.scales.shape)}"
        return (f"CacheTensors(storage={tuple(self.storage.shape)} {self.storage.dtype}, "
                f"data={tuple(self.data.shape)}, scales={scales})")


def packed_scale_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes a block of a quantized cache adds for its scales (padding included): 0 for a float
    cache. Padded so that the packed block divides into block_size rows and stays aligned."""
    if not is_quantized(dtype):
        return 0
    data_bytes = block_size * num_kv_heads * head_dim
    unit = math.lcm(block_size, ALIGN)
    total = data_bytes + 4 * num_kv_heads
    return -(-total // unit) * unit - data_bytes


def cache_block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block of one layer's K (or V) cache, scales included."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return (block_size * num_kv_heads * head_dim * elem
            + packed_scale_bytes(block_size, num_kv_heads, head_dim, dtype))


def allocate_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device | str) -> CacheTensors:
    """A zeroed K (or V) cache of num_blocks blocks (scales 0: a block's first write sets them)."""
    if not is_quantized(dtype):
        data = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        return CacheTensors(data, data, None)
    data_bytes = block_size * num_kv_heads * head_dim
    if data_bytes % 4:
        raise ValueError(f"a quantized KV cache needs block_size * heads * head_dim divisible by 4, "
                         f"got {block_size} * {num_kv_heads} * {head_dim}")
    block_bytes = cache_block_bytes(block_size, num_kv_heads, head_dim, dtype)
    storage = torch.zeros(num_blocks, block_size, 1, block_bytes // block_size, dtype=dtype, device=device)
    return packed_cache_views(storage, num_kv_heads, head_dim)


def packed_cache_views(storage: torch.Tensor, num_kv_heads: int, head_dim: int) -> CacheTensors:
    """The data and scale views of packed quantized blocks `storage` [NB, BS, 1, row_bytes]
    (contiguous, int8 or float8_e4m3fn; what allocate_cache makes)."""
    num_blocks, block_size = storage.shape[:2]
    block_bytes = cache_block_bytes(block_size, num_kv_heads, head_dim, storage.dtype)
    if not storage.is_contiguous() or storage[0].numel() != block_bytes:
        raise ValueError(f"packed cache storage {tuple(storage.shape)} does not hold contiguous blocks "
                         f"of {block_bytes} bytes")
    data_bytes = block_size * num_kv_heads * head_dim
    data = torch.as_strided(storage, (num_blocks, block_size, num_kv_heads, head_dim),
                            (block_bytes, num_kv_heads * head_dim, head_dim, 1))
    rows = storage.view(num_blocks, block_bytes).view(torch.uint8)
    scales = rows[:, data_bytes:data_bytes + 4 * num_kv_heads].view(torch.float32)
    return CacheTensors(storage, data, scales)
