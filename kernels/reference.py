"""Pure-PyTorch reference ops: the CPU path and the ground truth the Triton kernels are tested against.

Shapes use T = tokens in the packed batch, B = sequences, H = query heads, KVH = KV heads,
D = head dim, NB = physical blocks, BS = block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.cpu_decode_attention import DecodePlan, decode_attention
from pdserve.kernels.kv_quant import dequantize_blocks, is_quantized, write_quantized


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add.

    x, residual: [T, hidden]; weight: [hidden]. Returns (normed, new_residual) where
    new_residual = x + residual (or x when residual is None), computed in float32 like HF.
    """
    if residual is not None:
        x = x + residual
    normed = torch.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)  # x * rsqrt(mean(x^2) + eps)
    return weight * normed.to(x.dtype), x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: gate_up [T, 2*I] holding [gate | up] -> silu(gate) * up, [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, step_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] by position (HF's rotate-half convention).

    cos_sin_cache: [max_positions, D] holding [cos | sin] of the D/2 frequencies (float32).
    step_cache: as in paged_attention; keeps the step's [T, 1, D] cos and sin for later layers.
    """
    tables = step_cache.get("rotary") if step_cache is not None else None
    if tables is None:
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
        tables = (torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([sin, sin], dim=-1).unsqueeze(1))
        if step_cache is not None:
            step_cache["rotary"] = tables
    cos, sin = tables
    # q and k rotated as one tensor: half the elementwise calls, which dominate at decode sizes
    x = torch.cat([q, k], dim=1).to(torch.float32)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(q.dtype)
    return rotated[:, :q.shape[1]], rotated[:, q.shape[1]:]


def write_kv_to_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [T, KVH, D] into the paged caches [NB, BS, KVH, D] at flat slots [T].

    A slot of -1 means "do not store" (a padding token). With an int8/fp8 cache, k_scale and
    v_scale [NB, KVH] float32 are its per-block, per-head scales (see kernels/kv_quant.py).
    """
    if is_quantized(key_cache.dtype):
        if k_scale is None or v_scale is None:
            raise ValueError(f"a {key_cache.dtype} KV cache needs k_scale and v_scale")
        write_quantized(key, key_cache, k_scale, slot_mapping)
        write_quantized(value, value_cache, v_scale, slot_mapping)
        return
    num_blocks, block_size = key_cache.shape[:2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(num_blocks * block_size, *key_cache.shape[2:])[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(num_blocks * block_size, *value_cache.shape[2:])[slots] = value[valid].to(value_cache.dtype)


def gather_paged_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Read one sequence's first `length` tokens from a paged cache.

    cache: [NB, BS, KVH, D]; block_table: [max_blocks] int; returns [length, KVH, D] (float32,
    dequantized, when `scales` [NB, KVH] of an int8/fp8 cache are given).
    """
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    blocks = cache[ids]  # [n, BS, KVH, D]
    if scales is not None:
        blocks = dequantize_blocks(blocks, scales[ids])
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, query_lens_cpu: list[int] | None = None,
                    seq_lens_cpu: list[int] | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, step_cache: dict | None = None,
                    native_decode: bool = False) -> torch.Tensor:
    """Causal attention of packed queries over each sequence's paged K/V (prefill, chunked
    prefill with a cached prefix, and decode in one call).

    query: [T, H, D], the new tokens of B sequences packed back to back; sequence b's queries
    are query[query_start_loc[b]:query_start_loc[b+1]] and are the *last* q_len tokens of its
    seq_lens[b] tokens (their K/V must already be in the cache).
    key_cache/value_cache: [NB, BS, KVH, D]; block_tables: [B, max_blocks]; seq_lens: [B];
    query_start_loc: [B+1]; k_scale/v_scale: [NB, KVH] scales of an int8/fp8 cache. Returns [T, H, D].
    step_cache: a dict that lives for one step (AttentionMetadata.step_cache), where what depends
    only on the batch is kept for the step's other layers. native_decode: the native CPU kernel does
    the decode rows (the caller checked that it can: ops.paged_attention); the reference alone otherwise.
    """
    if is_quantized(key_cache.dtype) and (k_scale is None or v_scale is None):
        raise ValueError(f"a {key_cache.dtype} KV cache needs k_scale and v_scale")
    q_lens = query_lens_cpu or (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    s_lens = seq_lens_cpu or seq_lens.tolist()
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    decode_rows = [b for b, q_len in enumerate(q_lens) if q_len == 1]
    if decode_rows:
        plan = step_cache.get("cpu_decode_plan") if step_cache is not None else None
        if plan is None:
            plan = DecodePlan.build(block_tables, s_lens, starts, decode_rows, key_cache.shape[1], num_heads,
                                    num_kv_heads, query.device, native_decode, key_cache.shape[0])
            if step_cache is not None:
                step_cache["cpu_decode_plan"] = plan
        decode_attention(query, (key_cache, value_cache), (k_scale, v_scale), plan, scale, out)
    for b, q_len in enumerate(q_lens):
        if q_len == 1 or q_len == 0:
            continue
        ctx = s_lens[b]
        k = gather_paged_kv(key_cache, block_tables[b], ctx, k_scale).repeat_interleave(group, dim=1)
        v = gather_paged_kv(value_cache, block_tables[b], ctx, v_scale).repeat_interleave(group, dim=1)
        q = query[starts[b]:starts[b + 1]]
        # query i sits at position ctx - q_len + i and sees keys 0..that position.
        q_pos = torch.arange(ctx - q_len, ctx, device=query.device).unsqueeze(1)
        mask = torch.arange(ctx, device=query.device).unsqueeze(0) <= q_pos  # [q_len, ctx]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).to(q.dtype),
                                           v.transpose(0, 1).to(q.dtype), attn_mask=mask, scale=scale)
        out[starts[b]:starts[b + 1]] = o.transpose(0, 1)
    return out
