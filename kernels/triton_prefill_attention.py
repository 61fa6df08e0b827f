"""Triton varlen causal attention of packed queries over paged K/V (flash-style online softmax).

Covers prefill, chunked prefill and prefix-cache hits: sequence b's q_len queries are the last
q_len of its seq_len tokens, whose K/V (the cached prefix and the new tokens alike) are already in
the paged cache. Program (sequence, query tile, KV head) packs BLOCK_Q tokens x the `group` query
heads of that KV head into the rows of one tile, so K/V are read once per group. Decode rows
(q_len 1) work too. Reference: pdserve.kernels.reference.paged_attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import is_quantized
from pdserve.kernels.triton_paged_kv import launch_options, load_kv_tile

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
                    seq_lens_ptr, q_loc_ptr, out_ptr, sm_scale_log2, head_dim,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs,
                    stride_ch, stride_sb, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                    BLOCK_Q: tl.constexpr, D_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, QUANTIZED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (sequence, query tile, KV head): rows are BLOCK_Q query tokens x GROUP_P2 heads;
    keys run from 0 to the tile's last query position (causal), in steps of BLOCK_N."""
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(q_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(q_loc_ptr + seq + 1) - q_start).to(tl.int32)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of this sequence's first query
    rows = tl.arange(0, BLOCK_Q * GROUP_P2)
    tok = tile * BLOCK_Q + rows // GROUP_P2
    head = kv_head * GROUP + rows % GROUP_P2
    row_mask = (tok < q_len) & (rows % GROUP_P2 < GROUP)
    d = tl.arange(0, D_P2)
    q_mask = row_mask[:, None] & (d[None, :] < head_dim)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)
    q_pos = first_pos + tok
    kv_end = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_Q)  # causal: the tile's last query
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m = tl.full([BLOCK_Q * GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP_P2], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P2, D_P2], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < kv_end
        k, v, k_scale, v_scale = load_kv_tile(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_row, pos, pos_mask, kv_head, d,
            head_dim, stride_cb, stride_cs, stride_ch, stride_sb, BLOCK_SIZE, QUANTIZED)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        s = s * (k_scale * sm_scale_log2)[None, :]
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # padded rows see no key at all
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    dst = out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                            block_m: int = 128, block_n: int = 64, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of packed queries over paged K/V (contract of reference.paged_attention).

    query: [T, H, D]; caches [NB, BS, KVH, D] (int8/fp8 with k_scale/v_scale [NB, KVH] float32);
    block_tables: [B, max_blocks] int32; seq_lens: [B]; query_start_loc: [B+1];
    max_query_len: the longest q_len (host int, sizes the grid). Returns [T, H, D].
    block_m: rows per tile (query tokens x group heads); block_n: keys per inner step;
    num_warps/num_stages: launch options (Triton's defaults when None).
    """
    num_seqs = block_tables.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    quantized = is_quantized(key_cache.dtype)
    if quantized and (k_scale is None or v_scale is None):
        raise ValueError(f"a {key_cache.dtype} KV cache needs k_scale and v_scale")
    out = torch.empty_like(query)
    if num_seqs == 0 or max_query_len == 0:
        return out
    group_p2 = triton.next_power_of_2(group)
    block_q = max(1, block_m // group_p2)
    scales = k_scale if quantized else key_cache  # any tensor: unused when not quantized
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        query, key_cache, value_cache, scales, v_scale if quantized else scales, block_tables, seq_lens,
        query_start_loc, out, scale * LOG2E, head_dim, query.stride(0), query.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), *key_cache.stride()[:3], scales.stride(0),
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, D_P2=triton.next_power_of_2(head_dim),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, QUANTIZED=quantized,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **launch_options(num_warps if num_warps is not None else (8 if block_m >= 128 else 4), num_stages))
    return out
