"""Quantized KV cache (int8 or fp8 e4m3) with one float32 scale per block and KV head.

A quantized cache stores K (and V) as `q = quantize(x / scale)` in [NB, BS, KVH, D] int8 or
float8_e4m3fn, next to scales [NB, KVH] float32; `x ~= q * scale[block, head]`.

Writing tokens into a block (reference here, Triton kernel in kernels/triton_kv_write.py, same
rules so the two agree):
- the tokens a step writes into one block form a segment (consecutive offsets, one sequence);
- a segment starting at offset 0 opens the block afresh: its old scale is ignored;
- otherwise the block's scale grows to cover the new tokens, scale = max(old, amax / QMAX), and
  when it grows the tokens already in the block are requantized to it (q' = round(q * old / new));
- a scale of 0 (all-zero data) quantizes everything to 0.
int8 rounds half away from zero and saturates to [-127, 127]; fp8 rounds to nearest even and
saturates to [-448, 448].
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`--kv-cache-dtype` value -> the cache tensors' dtype ("auto" keeps the model's)."""
    if name == "auto":
        return model_dtype
    if name == "int8":
        return torch.int8
    if name == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"kv cache dtype {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype carries per-block scales."""
    return dtype in QUANTIZED_DTYPES


def quant_max(dtype: torch.dtype) -> float:
    """Largest magnitude a quantized value may take (127 for int8, 448 for fp8 e4m3)."""
    if dtype == torch.int8:
        return INT8_MAX
    if dtype == torch.float8_e4m3fn:
        return FP8_MAX
    raise ValueError(f"{dtype} is not a quantized KV cache dtype")


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x float32 [..., D] divided by scale (broadcast, float32) -> dtype values."""
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    y = x * inv
    if dtype == torch.int8:
        # round half away from zero, as the Triton kernel does (no rint in the interpreter)
        return (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., BS, KVH, D] quantized, scales [..., KVH] -> float32 [..., BS, KVH, D]."""
    return blocks.to(torch.float32) * scales.unsqueeze(-2).unsqueeze(-1)


def write_quantized(x: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Store x [T, KVH, D] into a quantized cache [NB, BS, KVH, D] with scales [NB, KVH] at flat
    slots [T] (-1 = skip), growing and requantizing block scales as the module docstring says.
    cache and scales may be strided views (kernels/kv_cache_alloc.py packs them per block)."""
    block_size, num_kv_heads = cache.shape[1:3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    if slots.numel() == 0:
        return
    xs = x[valid].to(torch.float32)
    blocks, offsets = slots // block_size, slots % block_size
    touched, inverse = torch.unique(blocks, return_inverse=True)
    n = touched.numel()
    device = xs.device
    amax = torch.zeros(n, num_kv_heads, device=device).scatter_reduce(
        0, inverse[:, None].expand(-1, num_kv_heads), xs.abs().amax(-1), "amax")
    first = torch.full((n,), block_size, dtype=torch.int64, device=device).scatter_reduce(
        0, inverse, offsets, "amin")
    old = torch.where(first[:, None] == 0, torch.zeros((), device=device), scales[touched].to(torch.float32))
    new = torch.maximum(old, amax / quant_max(cache.dtype))
    grow = (new > old) & (old > 0)  # [n, KVH]
    if bool(grow.any()):
        stored = cache[touched]  # [n, BS, KVH, D]
        requant = quantize(dequantize_blocks(stored, old), new[:, None, :, None], cache.dtype)
        earlier = torch.arange(block_size, device=device)[None, :] < first[:, None]  # [n, BS]
        keep = (earlier[:, :, None] & grow[:, None, :])[..., None]
        cache[touched] = torch.where(keep, requant, stored)
    scales[touched] = new.to(scales.dtype)
    cache[blocks, offsets] = quantize(xs, new[inverse][..., None], cache.dtype)
