"""Triton rotary embedding over q and k at once (reference: pdserve.kernels.reference.apply_rotary).

The table carries any frequency scaling (default, linear, llama3: models/rope.py builds it), so
one kernel serves them all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, row, stride_t, stride_h, out_stride_t, out_stride_h, num_heads,
                  cos, sin, HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    """Rotate the num_heads heads of one token (rotate-half convention), writing out_ptr."""
    heads = tl.arange(0, HEADS_P2)[:, None]
    cols = tl.arange(0, HALF_P2)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    base = row * stride_t + heads * stride_h + cols
    x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    out_base = row * out_stride_t + heads * out_stride_h + cols
    tl.store(out_ptr + out_base, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_base + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr,
                   num_heads, num_kv_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                   out_stride_qt, out_stride_qh, out_stride_kt, out_stride_kh, stride_cs,
                   HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                   KV_HEADS_P2: tl.constexpr):
    """One program per token: look up cos/sin of its position, rotate all its q and k heads."""
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    cols = tl.arange(0, HALF_P2)[None, :]
    cmask = cols < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + cols, mask=cmask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + cols, mask=cmask, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, row, stride_qt, stride_qh, out_stride_qt, out_stride_qh, num_heads,
                  cos, sin, HALF, HEADS_P2, HALF_P2)
    _rotate_heads(k_ptr, k_out_ptr, row, stride_kt, stride_kh, out_stride_kt, out_stride_kh, num_kv_heads,
                  cos, sin, HALF, KV_HEADS_P2, HALF_P2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] by positions [T]; cos_sin_cache [P, D] float32 holds
    [cos | sin] of the D/2 frequencies. q and k may be strided views (of a fused qkv projection)
    with unit last stride. Returns new contiguous (q, k)."""
    head_dim = q.shape[-1]
    if head_dim % 2 or k.shape[-1] != head_dim or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)} and the table "
                         f"{tuple(cos_sin_cache.shape)} need one even head_dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    cos_sin_cache = cos_sin_cache.to(torch.float32).contiguous()
    half = head_dim // 2
    if q.shape[0]:
        _rotary_kernel[(q.shape[0],)](
            q, k, q_out, k_out, positions, cos_sin_cache, q.shape[1], k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            HALF=half, HALF_P2=triton.next_power_of_2(half),
            HEADS_P2=triton.next_power_of_2(q.shape[1]), KV_HEADS_P2=triton.next_power_of_2(k.shape[1]))
    return q_out, k_out
