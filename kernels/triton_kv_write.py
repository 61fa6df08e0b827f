"""Triton KV write into paged slots, for float caches and for int8/fp8 caches with per-block,
per-head scales (reference: pdserve.kernels.reference.write_kv_to_cache; quantization rules in
kernels/kv_quant.py). Cache offsets are computed in int64: block ids times the block stride
pass 2**31 elements in caches of a few GiB."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import is_quantized, quant_max
from pdserve.kernels.triton_quant import quantize


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_kv_heads, head_dim,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                     BLOCK_SIZE: tl.constexpr, HEADS_P2: tl.constexpr, D_P2: tl.constexpr):
    """One program per token: copy its K and V [KVH, D] into slot (block, offset)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, D_P2)[None, :]
    mask = (heads < num_kv_heads) & (d < head_dim)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads * stride_ch + d
    k = tl.load(key_ptr + t * stride_kt + heads * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + heads * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_segment(x_ptr, cache_ptr, scale_ptr, t, head, block, offset, count, head_dim,
                   stride_xt, stride_xh, stride_cb, stride_cs, stride_ch, stride_sb,
                   QMAX: tl.constexpr, IS_INT8: tl.constexpr, BS_P2: tl.constexpr, D_P2: tl.constexpr):
    """Quantize tokens t..t+count-1 of one head into block rows offset..offset+count-1."""
    i = tl.arange(0, BS_P2)[:, None]
    d = tl.arange(0, D_P2)[None, :]
    mask = (i < count) & (d < head_dim)
    x = tl.load(x_ptr + (t + i) * stride_xt + head * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale_addr = scale_ptr + block * stride_sb + head
    old = tl.load(scale_addr)
    old = tl.where(offset == 0, 0.0, old)  # a segment at offset 0 opens the block afresh
    new = tl.maximum(old, amax / QMAX)
    block_base = cache_ptr + block * stride_cb + head * stride_ch
    if (new > old) & (old > 0):  # the scale grows: requantize the rows already written
        rows = block_base + i * stride_cs + d
        earlier = (i < offset) & (d < head_dim)
        stored = tl.load(rows, mask=earlier, other=0.0).to(tl.float32)
        tl.store(rows, quantize(stored * old, new, QMAX, IS_INT8).to(cache_ptr.dtype.element_ty),
                 mask=earlier)
    tl.store(scale_addr, new)
    dst = block_base + (offset + i) * stride_cs + d
    tl.store(dst, quantize(x, new, QMAX, IS_INT8).to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_quant_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                           slot_ptr, num_tokens, head_dim, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_cb, stride_cs, stride_ch, stride_sb,
                           BLOCK_SIZE: tl.constexpr, BS_P2: tl.constexpr, D_P2: tl.constexpr,
                           QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """Program (token t, KV head): when t starts a segment (its block's run of consecutive slots
    in this step), quantize the whole segment for this head; other programs exit."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    prev = tl.load(slot_ptr + t - 1, mask=t > 0, other=-1).to(tl.int64)
    offset = slot % BLOCK_SIZE
    if (slot < 0) | ((prev >= 0) & (prev + 1 == slot) & (offset != 0)):
        return
    i = tl.arange(0, BS_P2)
    nxt = tl.load(slot_ptr + t + i, mask=(t + i < num_tokens) & (offset + i < BLOCK_SIZE), other=-1)
    # the segment is the run of slots slot, slot+1, ... from t on (first break ends it)
    count = tl.min(tl.where(nxt.to(tl.int64) == slot + i, BS_P2, i), axis=0)
    block = slot // BLOCK_SIZE
    _write_segment(key_ptr, k_cache_ptr, k_scale_ptr, t, head, block, offset, count, head_dim,
                   stride_kt, stride_kh, stride_cb, stride_cs, stride_ch, stride_sb,
                   QMAX, IS_INT8, BS_P2, D_P2)
    _write_segment(value_ptr, v_cache_ptr, v_scale_ptr, t, head, block, offset, count, head_dim,
                   stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, stride_sb,
                   QMAX, IS_INT8, BS_P2, D_P2)


def write_kv_to_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [T, KVH, D] into paged caches [NB, BS, KVH, D] at flat slots [T] (-1 skips).

    For int8/fp8 caches k_scale/v_scale [NB, KVH] float32 are read and updated, and the tokens a
    step writes into one block must be consecutive in the batch (as the runner packs them). The K
    and V caches must share strides (they are allocated alike); key/value need unit last stride.
    """
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    if key_cache.stride() != value_cache.stride() or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("write_kv_to_cache: K and V caches must share strides; key/value need unit last stride")
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    strides = (key.stride(0), key.stride(1), value.stride(0), value.stride(1), *key_cache.stride()[:3])
    d_p2 = triton.next_power_of_2(head_dim)
    if not is_quantized(key_cache.dtype):
        _write_kv_kernel[(num_tokens,)](
            key, value, key_cache, value_cache, slot_mapping, num_kv_heads, head_dim, *strides,
            BLOCK_SIZE=block_size, HEADS_P2=triton.next_power_of_2(num_kv_heads), D_P2=d_p2)
        return
    if k_scale is None or v_scale is None or k_scale.stride() != v_scale.stride() or k_scale.stride(1) != 1:
        raise ValueError(f"a {key_cache.dtype} KV cache needs k_scale and v_scale [NB, KVH] alike")
    _write_kv_quant_kernel[(num_tokens, num_kv_heads)](
        key, value, key_cache, value_cache, k_scale, v_scale, slot_mapping, num_tokens, head_dim,
        *strides, k_scale.stride(0), BLOCK_SIZE=block_size, BS_P2=triton.next_power_of_2(block_size),
        D_P2=d_p2, QMAX=quant_max(key_cache.dtype), IS_INT8=key_cache.dtype == torch.int8)
