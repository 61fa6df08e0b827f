"""Decode attention for the CPU path: single-token queries of many sequences over a paged cache.

`reference.paged_attention` sends its q_len-1 rows here. The work is memory-bound and the queries
are tiny (`group` query heads per KV head), so what matters is how K/V are read:
- rows are grouped by context length (each group padded to its longest row, at most 2x its
  shortest), so that one long row does not pad every short one to its length;
- a group's blocks are gathered with one block-granular `index_select` and made head-major
  ([m * KVH, ctx, D], one copy), so that both products are single contiguous batched matmuls:
  [group, D] x [D, ctx] and [group, ctx] x [ctx, D] per (row, KV head). SDPA with q_len = group
  spends most of its time in per-(row, head) setup at these shapes.
Slots past a row's length hold whatever their block held before. Their scores are set to -inf
(which also replaces a NaN), so they get probability 0; if the output is nonetheless non-finite
(a stale inf/NaN value times 0), the group is recomputed with those V slots zeroed, which is what
the Triton kernel does (it loads zeros there).
"""

from __future__ import annotations

import torch

from kernels.kv_quant import dequantize_blocks

MAX_PADDING_FACTOR = 2  # a group's longest context is at most this times its shortest


def group_rows_by_length(rows: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Rows in groups of similar context length: longest first, a new group whenever a row is
    shorter than 1/MAX_PADDING_FACTOR of its group's longest. At most log2(max/min) + 1 groups."""
    order = sorted(rows, key=lambda b: seq_lens[b], reverse=True)
    groups: list[list[int]] = []
    for b in order:
        if groups and seq_lens[b] * MAX_PADDING_FACTOR >= seq_lens[groups[-1][0]]:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def decode_attention(query: torch.Tensor, caches: tuple[torch.Tensor, torch.Tensor],
                     scales: tuple[torch.Tensor | None, torch.Tensor | None], block_tables: torch.Tensor,
                     seq_lens: list[int], starts: list[int], rows: list[int], scale: float,
                     out: torch.Tensor) -> None:
    """Attention of one query token per row over that row's first seq_lens[row] cached tokens.

    query/out: [T, H, D] (row b's token at starts[b]; only those tokens of `out` are written);
    caches: (key, value) [NB, BS, KVH, D]; scales: their [NB, KVH] scales for an int8/fp8 cache,
    else None; block_tables: [B, max_blocks]; seq_lens, starts: per row b, Python ints.
    """
    for group in group_rows_by_length(rows, seq_lens):
        _attend_group(query, caches, scales, block_tables, seq_lens, starts, group, scale, out)


def _attend_group(query, caches, scales, block_tables, seq_lens, starts, rows, scale, out) -> None:
    """decode_attention for rows padded to one length (ctx, a whole number of blocks)."""
    block_size, num_kv_heads, head_dim = caches[0].shape[1:]
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    device = query.device
    m = len(rows)
    lens = torch.tensor([seq_lens[b] for b in rows], device=device)
    num_blocks = -(-seq_lens[rows[0]] // block_size)  # rows[0] is the longest
    ctx = num_blocks * block_size
    tables = block_tables[torch.tensor(rows, device=block_tables.device), :num_blocks]
    tables = tables.reshape(-1).long().to(device)
    valid = torch.arange(ctx, device=device).unsqueeze(0) < lens.unsqueeze(1)  # [m, ctx]
    idx = torch.tensor([starts[b] for b in rows], device=device)
    q = query[idx].view(m * num_kv_heads, group, head_dim)  # query head h uses KV head h // group

    def gather(cache: torch.Tensor, cache_scales: torch.Tensor | None) -> torch.Tensor:
        blocks = cache.index_select(0, tables)  # [m * blocks, BS, KVH, D]
        if cache_scales is not None:
            blocks = dequantize_blocks(blocks, cache_scales.index_select(0, tables))
        return blocks.to(q.dtype).view(m, ctx, num_kv_heads, head_dim)

    k, v = gather(caches[0], scales[0]), gather(caches[1], scales[1])
    k = k.transpose(1, 2).reshape(m * num_kv_heads, ctx, head_dim)
    scores = torch.bmm(q, k.transpose(1, 2)).view(m, num_heads, ctx).float() * scale
    scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))
    probs = scores.softmax(-1).to(q.dtype).view(m * num_kv_heads, group, ctx)
    o = _weighted_values(probs, v, m, num_kv_heads, ctx, head_dim)
    if not bool(torch.isfinite(o).all()):
        o = _weighted_values(probs, v.masked_fill(~valid[:, :, None, None], 0.0), m, num_kv_heads, ctx,
                             head_dim)
    out[idx] = o.view(m, num_heads, head_dim).to(out.dtype)


def _weighted_values(probs: torch.Tensor, v: torch.Tensor, m: int, num_kv_heads: int, ctx: int,
                     head_dim: int) -> torch.Tensor:
    """probs [m * KVH, group, ctx] x v [m, ctx, KVH, D] -> [m * KVH, group, D]."""
    v = v.transpose(1, 2).reshape(m * num_kv_heads, ctx, head_dim)
    return torch.bmm(probs, v)
