"""Triton paged decode attention: one query token per sequence over its paged K/V, split-K.

Program (sequence, KV head, split) attends the `group` query heads sharing that KV head (packed
as the rows of one tile, so K/V are read once per group) over its share of the context, keeping
an online softmax; a second kernel merges the splits by their log-sum-exp. With one split the
first kernel writes the output itself. Reference: pdserve.kernels.reference.paged_attention (q_len 1).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_quant import is_quantized
from pdserve.kernels.triton_paged_kv import launch_options, load_kv_tile

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
                         seq_lens_ptr, q_loc_ptr, out_ptr, part_out_ptr, part_lse_ptr, sm_scale_log2,
                         num_splits, head_dim, stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_bt, stride_cb, stride_cs, stride_ch, stride_sb,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D_P2: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANTIZED: tl.constexpr,
                         SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (sequence, KV head, split): online softmax of the GROUP query heads of this KV head
    over this split's positions; writes the output (one split) or its part and log2-sum-exp."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    rows = tl.arange(0, BLOCK_H)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    d = tl.arange(0, D_P2)
    q_row = tl.load(q_loc_ptr + seq).to(tl.int64)
    q_mask = row_mask[:, None] & (d[None, :] < head_dim)
    q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_P2], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        k, v, k_scale, v_scale = load_kv_tile(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_row, pos, pos_mask, kv_head, d,
            head_dim, stride_cb, stride_cs, stride_ch, stride_sb, BLOCK_SIZE, QUANTIZED)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        s = s * (k_scale * sm_scale_log2)[None, :]
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if SINGLE_SPLIT:
        dst = out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        part = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], out, mask=q_mask)
        tl.store(part_lse_ptr + part, lse, mask=row_mask)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, q_loc_ptr, out_ptr, num_splits, head_dim,
                         stride_ot, stride_oh, SPLITS_P2: tl.constexpr, D_P2: tl.constexpr):
    """Program (sequence, query head): weight each split's output by exp2(lse - max lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, D_P2)
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
    mask = (splits[:, None] < num_splits) & (d[None, :] < head_dim)
    outs = tl.load(part_out_ptr + part[:, None] * head_dim + d[None, :], mask=mask, other=0.0)
    merged = tl.sum(outs * weight[:, None], axis=0) / tl.maximum(tl.sum(weight, axis=0), 1e-30)
    q_row = tl.load(q_loc_ptr + seq).to(tl.int64)
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + d, merged.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_n: int,
                      num_sms: int) -> int:
    """Splits of the context so that batch * KV heads * splits programs fill the GPU about
    twice over, each split keeping at least 4 tiles of block_n positions."""
    programs = max(1, batch * num_kv_heads)
    wanted = math.ceil(2 * num_sms / programs)
    return max(1, min(wanted, math.ceil(max_seq_len / (4 * block_n)), 64))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, num_splits: int = 1,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           out: torch.Tensor | None = None, block_n: int = 64,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Decode attention: sequence b's one query is query[query_start_loc[b]] (q_len 1 each).

    query: [T, H, D]; caches [NB, BS, KVH, D] (int8/fp8 with k_scale/v_scale [NB, KVH]);
    block_tables: [B, max_blocks] int32; seq_lens: [B] (0 for a padding row: output 0).
    Returns out [T, H, D] (rows of query that are no sequence's query are left as they are).
    block_n: keys per inner step; num_warps/num_stages: launch options (None: Triton's defaults).
    """
    num_seqs = block_tables.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    quantized = is_quantized(key_cache.dtype)
    if quantized and (k_scale is None or v_scale is None):
        raise ValueError(f"a {key_cache.dtype} KV cache needs k_scale and v_scale")
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    scales = k_scale if quantized else key_cache  # any tensor: unused when not quantized
    parts = lses = out
    if num_splits > 1:
        parts = torch.empty(num_seqs * num_heads * num_splits * head_dim, dtype=torch.float32,
                            device=query.device)
        lses = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=query.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, scales, v_scale if quantized else scales, block_tables, seq_lens,
        query_start_loc, out, parts, lses, scale * LOG2E, num_splits, head_dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *key_cache.stride()[:3], scales.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D_P2=triton.next_power_of_2(head_dim),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, QUANTIZED=quantized, SINGLE_SPLIT=num_splits == 1,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **launch_options(num_warps, num_stages))
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            parts, lses, query_start_loc, out, num_splits, head_dim, out.stride(0), out.stride(1),
            SPLITS_P2=triton.next_power_of_2(num_splits), D_P2=triton.next_power_of_2(head_dim))
    return out
