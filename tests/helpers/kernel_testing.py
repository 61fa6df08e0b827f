"""Helpers for the Triton kernel tests: run the kernels on a GPU when there is one, else under
the Triton interpreter on CPU tensors; build paged caches with scattered (and huge) block ids.

Import this module before any pdserve.kernels.triton_* module: TRITON_INTERPRET is read when a kernel is
decorated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from pdserve.kernels.kv_cache_alloc import CacheTensors, allocate_cache, cache_block_bytes, packed_cache_views  # noqa: E402
from pdserve.kernels.kv_quant import is_quantized  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Elements before a sparse cache's first block: a kernel that wrapped its offsets at 2**31 would
# land there (mapped zeros, so a wrong answer rather than a crash).
SPARSE_BASE_ELEMENTS = 2**31
INT32_LIMIT = 2**31


@dataclass
class PagedCaches:
    """One layer's K and V caches (views the kernels take) over their storage."""

    key: CacheTensors
    value: CacheTensors

    @property
    def args(self) -> tuple:
        """(key data, value data, k_scale, v_scale) as the ops take them."""
        return self.key.data, self.value.data, self.key.scales, self.value.scales


def paged_caches(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> PagedCaches:
    """Zeroed K and V caches on DEVICE, allocated as the model runner allocates them."""
    return PagedCaches(*(allocate_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, DEVICE)
                         for _ in range(2)))


def sparse_caches(directory, min_block_id: int, num_blocks: int, block_size: int, num_kv_heads: int,
                  head_dim: int, dtype: torch.dtype) -> tuple[PagedCaches, int]:
    """K and V caches whose block ids reach past 2**31 elements of offset, at no memory cost.

    Each cache lives in a sparse file mapped shared (torch.from_file): only the pages a test
    touches exist. The cache starts SPARSE_BASE_ELEMENTS elements into the mapping, and the
    test's blocks are first .. first + num_blocks - 1, with first >= min_block_id and first *
    block stride >= 2**31 elements, so an offset computed in int32 wraps to a mapped (zero)
    address before the cache instead of the right block. Returns (caches, first).
    """
    block_elems = cache_block_bytes(block_size, num_kv_heads, head_dim, dtype) // _element_size(dtype)
    first = max(min_block_id, -(-INT32_LIMIT // block_elems))
    total_blocks = first + num_blocks
    os.makedirs(directory, exist_ok=True)
    caches = []
    for name in ("key", "value"):
        path = os.path.join(directory, f"{name}.bin")
        size = SPARSE_BASE_ELEMENTS + total_blocks * block_elems
        with open(path, "wb") as f:
            f.truncate(size * _element_size(dtype))
        flat = torch.from_file(path, shared=True, size=size, dtype=dtype)[SPARSE_BASE_ELEMENTS:]
        if is_quantized(dtype):
            storage = flat.view(total_blocks, block_size, 1, block_elems // block_size)
            caches.append(packed_cache_views(storage, num_kv_heads, head_dim))
        else:
            data = flat.view(total_blocks, block_size, num_kv_heads, head_dim)
            caches.append(CacheTensors(data, data, None))
    return PagedCaches(*caches), first


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def block_tables_for(seq_lens: list[int], block_size: int, block_ids: list[int]) -> torch.Tensor:
    """[B, max_blocks] int32 tables drawing each sequence's blocks in turn from block_ids."""
    counts = [-(-n // block_size) for n in seq_lens]
    if sum(counts) > len(block_ids):
        raise ValueError(f"{sum(counts)} blocks needed, {len(block_ids)} given")
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    used = 0
    for row, count in enumerate(counts):
        tables[row, :count] = torch.tensor(block_ids[used:used + count], dtype=torch.int32)
        used += count
    return tables


def slots_for(tables: torch.Tensor, starts: list[int], ends: list[int], block_size: int) -> torch.Tensor:
    """Flat slots [T] of positions start..end-1 of each sequence (int64), packed in order."""
    slots = []
    for row, (start, end) in enumerate(zip(starts, ends)):
        slots += [int(tables[row, p // block_size]) * block_size + p % block_size for p in range(start, end)]
    return torch.tensor(slots, dtype=torch.int64)


def fill_caches(caches: PagedCaches, tables: torch.Tensor, seq_lens: list[int], block_size: int,
                gen: torch.Generator) -> None:
    """Write random K/V (normal, std 1) for every position of every sequence, with the reference
    write (quantizing when the cache is int8/fp8)."""
    from pdserve.kernels import reference

    slots = slots_for(tables, [0] * len(seq_lens), seq_lens, block_size)
    heads, head_dim = caches.key.data.shape[2:]
    key = torch.randn(len(slots), heads, head_dim, generator=gen)
    value = torch.randn(len(slots), heads, head_dim, generator=gen)
    k_data, v_data, k_scale, v_scale = caches.args
    reference.write_kv_to_cache(key.to(DEVICE), value.to(DEVICE), k_data, v_data, slots.to(DEVICE),
                                k_scale, v_scale)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Kernel vs reference, with the tolerance the compute dtype allows."""
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol, rtol=tol)
