"""Triton RMSNorm with the residual add fused in (reference: pdserve.kernels.reference.rms_norm)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: out = w * normalize(x + residual), res_out = x + residual."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # the sum is rounded to the activation dtype, as the reference's `x + residual` is
        summed = (x + res).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add (same contract as the reference).

    x, residual: [T, hidden]; weight: [hidden]. Returns (normed [T, hidden], x + residual, or x
    itself when residual is None).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm needs a [T, hidden] tensor with unit last stride, got {tuple(x.shape)}")
    num_rows, hidden = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if num_rows:
        res_in = residual if residual is not None else x
        _rms_norm_kernel[(num_rows,)](
            x, res_in, weight, out, res_out, hidden, eps,
            x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return out, res_out
