"""Shared by the attention kernels: loading one tile of K and V from the paged cache (int64
offsets) with the per-position scales of an int8/fp8 cache; launch options."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_row, pos, pos_mask,
                 kv_head, d, head_dim, stride_cb, stride_cs, stride_ch, stride_sb,
                 BLOCK_SIZE: tl.constexpr, QUANTIZED: tl.constexpr):
    """K and V [BLOCK_N, D_P2] at positions `pos` [BLOCK_N] of one sequence's KV head (zeros where
    masked), and their scales [BLOCK_N] (1.0 for a float cache). Block ids are widened to int64
    before multiplying by the block stride: offsets pass 2**31 elements in large caches."""
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    offsets = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    mask = pos_mask[:, None] & (d[None, :] < head_dim)
    k = tl.load(k_cache_ptr + offsets[:, None] + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offsets[:, None] + d[None, :], mask=mask, other=0.0)
    if QUANTIZED:
        k_scale = tl.load(k_scale_ptr + block * stride_sb + kv_head, mask=pos_mask, other=0.0)
        v_scale = tl.load(v_scale_ptr + block * stride_sb + kv_head, mask=pos_mask, other=0.0)
    else:
        k_scale = tl.full(pos.shape, 1.0, tl.float32)
        v_scale = k_scale
    return k, v, k_scale, v_scale


def launch_options(num_warps: int | None, num_stages: int | None) -> dict:
    """Kernel launch keywords, leaving out those not given (Triton picks its defaults)."""
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return {k: v for k, v in options.items() if v is not None}
