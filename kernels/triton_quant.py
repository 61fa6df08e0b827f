"""Triton helpers for the int8/fp8 KV cache, matching kernels/kv_quant.py's rounding."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(y):
    """float32 y (|y| <= 448) rounded to the nearest-even float8 e4m3 value, kept in float32.

    Done with exact integer and float ops so that the cast to fp8 afterwards is exact: the result
    is the same on every GPU and in the interpreter (whose own fp32 -> fp8 rounding can drop the
    carry into the exponent).
    """
    bits = y.to(tl.int32, bitcast=True)
    # round the 23 mantissa bits to 3, ties to even (a carry may bump the exponent: correct)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (y + 24576.0) - 24576.0  # 1.5 * 2**14: rounds to a multiple of 2**-9
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def quantize(x, scale, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """float32 x / scale -> int8 (round half away from zero) or fp8 e4m3 (nearest even),
    saturated to +-QMAX; a scale of 0 gives 0."""
    inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
    y = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
    if IS_INT8:
        y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
        return y.to(tl.int8)
    return round_to_e4m3(y).to(tl.float8e4nv)
