"""Decode attention for the CPU path: single-token queries of many sequences over a paged cache.

`reference.paged_attention` sends its q_len-1 rows here. With a bfloat16 model and cache, a head dim
the kernel takes (16 to 256, powers of two) and the native kernels available (kernels/cpu_native.py), one native call
does every row and layer's work in place: each (row, KV head) reads its blocks once, scores, softmax
and the weighted sum in float32. Otherwise it runs in PyTorch ops, as follows. The work is memory-bound and the queries
are tiny (`group` query heads per KV head), so what matters is how often K/V are copied:
- rows are grouped by context length (each group padded to its longest row, at most 2x its
  shortest), so that one long row does not pad every short one to its length;
- a group's blocks are gathered with one block-granular `index_select` each for K and V, as
  [m, ctx, KVH * D], and used in that layout: each query head is placed in its KV head's slot of
  an otherwise zero [H, KVH * D] matrix, so QK^T is one contiguous batched matmul, and PV another
  whose [H, KVH * D] result is read back at each head's own slot. That spends KVH times the
  (cheap) multiply-adds to save the copy a head-major layout would cost (SDPA at q_len = group
  spends most of its time in per-(row, head) setup at these shapes).
Everything that depends only on the batch (groups, block ids, masks) is computed once per step,
in a DecodePlan that the layers share.

Precision: the products run in the model's dtype and the softmax in float32, as transformers'
eager attention does. In bfloat16 the scores are therefore rounded before the softmax, which
roughly doubles the error against exact attention compared with SDPA (float32 scores); computing
them in float32 here made a bfloat16 decode step ~25% slower on a 2-core CPU.

Slots past a row's length hold whatever their block held before. Their scores are set to -inf
(which also replaces a NaN), so they get probability 0; if the output nonetheless has a NaN (a
stale inf/NaN value times 0), the group is recomputed with those V slots zeroed, which is what
the Triton kernel does (it loads zeros there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels.cpu_native import ATTENTION_HEAD_DIMS, native_kernels
from pdserve.kernels.kv_quant import dequantize_blocks

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


@dataclass
class RowGroup:
    """m rows padded to ctx = num_blocks * block_size slots.

    tokens: [m] positions of the rows' query tokens in the packed batch; block_ids: [m * blocks]
    their blocks, row by row; padding: [m, 1, ctx] True at slots past a row's length.
    """

    tokens: torch.Tensor
    block_ids: torch.Tensor
    padding: torch.Tensor
    num_blocks: int


@dataclass
class DecodePlan:
    """The row groups of one step's decode rows, shared by every layer of that step.

    heads: [H] 0..H-1; kv_slot: [H] the KV head each query head reads (h // (H / KVH)).
    native_rows: for the native kernel, (tokens [R], lengths [R], block tables [R, max_blocks]) of the
    rows in int32, or None when the PyTorch path is used.
    """

    groups: list[RowGroup]
    heads: torch.Tensor
    kv_slot: torch.Tensor
    native_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, block_tables: torch.Tensor, seq_lens: list[int], starts: list[int], rows: list[int],
              block_size: int, num_heads: int, num_kv_heads: int, device: torch.device,
              native: bool = False, num_blocks: int = 0) -> DecodePlan:
        """Group rows (their seq_lens, and starts: their token positions) and look up their blocks
        (native: the rows' int32 tables for the native kernel instead, checked against the cache's
        num_blocks, since the kernel reads them unchecked)."""
        heads = torch.arange(num_heads, device=device)
        kv_slot = heads // (num_heads // num_kv_heads)
        if native:
            if block_tables.numel() and (int(block_tables.max()) >= num_blocks or int(block_tables.min()) < 0):
                raise IndexError(f"a block id is past the cache's {num_blocks} blocks")
            if max(seq_lens[b] for b in rows) > block_tables.shape[1] * block_size:
                raise ValueError(f"a row's context is longer than its {block_tables.shape[1]} blocks")
            index = torch.tensor(rows)
            native_rows = (torch.tensor([starts[b] for b in rows], dtype=torch.int32),
                           torch.tensor([seq_lens[b] for b in rows], dtype=torch.int32),
                           block_tables.index_select(0, index).to(torch.int32).contiguous())
            return cls([], heads, kv_slot, native_rows)
        groups = []
        for rows_in_group in group_rows_by_length(rows, seq_lens):
            num_blocks = -(-seq_lens[rows_in_group[0]] // block_size)  # the first is the longest
            index = torch.tensor(rows_in_group, device=block_tables.device)
            block_ids = block_tables[index, :num_blocks].reshape(-1).to(device=device, dtype=torch.long)
            lens = torch.tensor([seq_lens[b] for b in rows_in_group], device=device)
            slots = torch.arange(num_blocks * block_size, device=device)
            padding = (slots.unsqueeze(0) >= lens.unsqueeze(1)).unsqueeze(1)
            tokens = torch.tensor([starts[b] for b in rows_in_group], device=device)
            groups.append(RowGroup(tokens, block_ids, padding, num_blocks))
        return cls(groups, heads, kv_slot)


def native_decode_fits(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       k_scale: torch.Tensor | None) -> bool:
    """Whether the native kernel takes this step's decode attention as laid out (the dtypes and the
    kernels' availability are the caller's, ops.use_native): caches not quantized, the same shape,
    contiguous, a head dim the kernel takes, query heads a multiple of the KV heads."""
    return (k_scale is None and value_cache.shape == key_cache.shape and key_cache.shape[-1] in ATTENTION_HEAD_DIMS
            and key_cache.is_contiguous() and value_cache.is_contiguous() and query.dim() == 3
            and query.shape[-1] == key_cache.shape[-1] and query.shape[1] % key_cache.shape[2] == 0
            and query.stride(-1) == 1)


def decode_attention(query: torch.Tensor, caches: tuple[torch.Tensor, torch.Tensor],
                     scales: tuple[torch.Tensor | None, torch.Tensor | None], plan: DecodePlan,
                     scale: float, out: torch.Tensor) -> None:
    """Attention of each planned row's query token over that row's cached tokens.

    query/out: [T, H, D] (only the planned rows' tokens of `out` are written); caches: (key,
    value) [NB, BS, KVH, D]; scales: their [NB, KVH] scales for an int8/fp8 cache, else None.
    """
    if plan.native_rows is not None:
        native_kernels().decode_attention(query, caches[0], caches[1], *plan.native_rows, scale, out)
        return
    num_heads = query.shape[1]
    num_kv_heads, head_dim = caches[0].shape[2:]
    heads, kv_slot = plan.heads, plan.kv_slot
    for group in plan.groups:
        m = group.tokens.numel()
        k, v = (_gather(cache, cache_scales, group, query.dtype) for cache, cache_scales in zip(caches, scales))
        q = query.new_zeros(m, num_heads, num_kv_heads, head_dim)
        q[:, heads, kv_slot] = query[group.tokens]
        scores = torch.bmm(q.view(m, num_heads, -1), k.transpose(1, 2)).float() * scale  # [m, H, ctx]
        scores.masked_fill_(group.padding, float("-inf"))
        probs = scores.softmax(-1).to(query.dtype)
        o = _own_slots(torch.bmm(probs, v), heads, kv_slot, head_dim)
        if bool(o.isnan().any()):
            o = _own_slots(torch.bmm(probs, v.masked_fill(group.padding.transpose(1, 2), 0.0)), heads, kv_slot,
                           head_dim)
        out[group.tokens] = o.to(out.dtype)


def _own_slots(o: torch.Tensor, heads: torch.Tensor, kv_slot: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[m, H, KVH * D] products of every head with every KV head's values -> [m, H, D], each head's
    own KV head's."""
    return o.view(o.shape[0], o.shape[1], -1, head_dim)[:, heads, kv_slot]


def _gather(cache: torch.Tensor, cache_scales: torch.Tensor | None, group: RowGroup,
            dtype: torch.dtype) -> torch.Tensor:
    """The group's K (or V) as [m, ctx, KVH * D] in the query's dtype (dequantized if int8/fp8)."""
    blocks = cache.index_select(0, group.block_ids)  # [m * blocks, BS, KVH, D]
    if cache_scales is not None:
        blocks = dequantize_blocks(blocks, cache_scales.index_select(0, group.block_ids))
    m = group.tokens.numel()
    return blocks.to(dtype).view(m, group.num_blocks * cache.shape[1], -1)
