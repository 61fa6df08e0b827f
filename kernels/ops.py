"""The ops the model calls, dispatched to the Triton kernels on CUDA, to the native CPU kernels
(kernels/cpu_native.py) for bfloat16 on a CPU that runs them, and to the PyTorch reference
(kernels/reference.py) everywhere else. Signatures are those of the reference.

`PDSERVE_KERNELS` (read at import, or set `ops.BACKEND`) picks: "auto" (Triton for CUDA
tensors, native or reference on the CPU), "reference" (always), "triton" (always; on the CPU this
needs TRITON_INTERPRET=1 and is only for tests).
"""

from __future__ import annotations

import os
from functools import cache

import torch

from pdserve.kernels import reference
from pdserve.kernels.cpu_decode_attention import native_decode_fits
from pdserve.kernels.cpu_native import CpuNativeKernels, native_kernels

BACKENDS = ("auto", "reference", "triton")
BACKEND = os.environ.get("PDSERVE_KERNELS", "auto")
if BACKEND not in BACKENDS:
    raise ValueError(f"PDSERVE_KERNELS={BACKEND!r} is not one of {', '.join(BACKENDS)}")

# Decode split-K override (None: chosen per step from the batch and context lengths). CUDA-graph
# capture fixes it so that a replayed graph runs the same launch whatever the context lengths.
DECODE_NUM_SPLITS: int | None = None


@cache
def triton_available() -> bool:
    """Whether the triton package imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """The dispatch rule: Triton for CUDA tensors (when installed), or everywhere when forced."""
    if BACKEND == "reference":
        return False
    if BACKEND == "triton":
        return True
    return tensor.is_cuda and triton_available()


def use_native(*tensors: torch.Tensor) -> CpuNativeKernels | None:
    """The native CPU kernels when the backend is "auto", every tensor is a bfloat16 CPU tensor and the
    kernels run here; else None."""
    if BACKEND != "auto" or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
        return None
    return native_kernels()


def rms_norm(x, weight, eps, residual=None):
    """See reference.rms_norm: x, residual [T, hidden] -> (normed, x + residual)."""
    if use_triton(x):
        from pdserve.kernels.triton_norm import rms_norm as triton_rms_norm
        return triton_rms_norm(x, weight, eps, residual)
    native = use_native(x, weight, *([] if residual is None else [residual]))
    if (native is not None and x.dim() == 2 and x.shape[-1] % 16 == 0 and x.is_contiguous()
            and weight.shape == x.shape[-1:] and weight.is_contiguous()
            and (residual is None or (residual.shape == x.shape and residual.is_contiguous()))):
        return native.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul(gate_up):
    """See reference.silu_and_mul: [T, 2*I] -> [T, I]."""
    if use_triton(gate_up):
        from pdserve.kernels.triton_activation import silu_and_mul as triton_silu_and_mul
        return triton_silu_and_mul(gate_up)
    native = use_native(gate_up)
    if native is not None and gate_up.dim() == 2 and gate_up.shape[-1] % 32 == 0 and gate_up.stride(-1) == 1:
        return native.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def apply_rotary(q, k, positions, cos_sin_cache, step_cache=None):
    """See reference.apply_rotary: rotate q [T, H, D] and k [T, KVH, D] by position
    (step_cache is the reference's). The native kernel rotates q and k in place and returns them."""
    if use_triton(q):
        from pdserve.kernels.triton_rotary import apply_rotary as triton_apply_rotary
        return triton_apply_rotary(q, k, positions, cos_sin_cache)
    native = use_native(q, k)
    if (native is not None and q.dim() == 3 and k.dim() == 3 and q.shape[-1] % 32 == 0
            and k.shape[-1] == q.shape[-1] == cos_sin_cache.shape[-1] and q.stride(-1) == 1 and k.stride(-1) == 1
            and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
            and positions.dtype == torch.int64 and positions.is_contiguous()
            and positions.numel() == q.shape[0] == k.shape[0]):
        _check_positions(positions, cos_sin_cache.shape[0], step_cache)
        native.rotary_in_place(q, k, positions, cos_sin_cache)
        return q, k
    return reference.apply_rotary(q, k, positions, cos_sin_cache, step_cache)


def _check_positions(positions: torch.Tensor, table_rows: int, step_cache: dict | None) -> None:
    """Positions [T] must index the rotary table (the native kernel reads it unchecked); once per step."""
    if step_cache is not None and step_cache.get("rotary_positions_checked"):
        return
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= table_rows):
        raise IndexError(f"a position is outside the rotary table's 0..{table_rows - 1}")
    if step_cache is not None:
        step_cache["rotary_positions_checked"] = True


def write_kv_to_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None):
    """See reference.write_kv_to_cache: store [T, KVH, D] at flat slots (int8/fp8 with scales)."""
    if use_triton(key):
        from pdserve.kernels.triton_kv_write import write_kv_to_cache as triton_write
        return triton_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    native = use_native(key, value, key_cache, value_cache)
    if (native is not None and key_cache.is_contiguous() and value_cache.is_contiguous() and key.stride(-1) == 1
            and value.stride(-1) == 1 and key.dim() == 3 and key.shape == value.shape
            and key.shape[1:] == key_cache.shape[2:] and value_cache.shape == key_cache.shape
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and slot_mapping.numel() == key.shape[0]):
        if slot_mapping.numel() and int(slot_mapping.max()) >= key_cache.shape[0] * key_cache.shape[1]:
            raise IndexError(f"KV slot {int(slot_mapping.max())} is past the cache's {key_cache.shape[0]} blocks")
        return native.write_kv(key, value, key_cache, value_cache, slot_mapping)
    return reference.write_kv_to_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                    query_lens_cpu=None, seq_lens_cpu=None, k_scale=None, v_scale=None, step_cache=None):
    """See reference.paged_attention. On the Triton path a step of only decode tokens runs the
    split-K decode kernel; any step with a longer chunk runs the varlen prefill kernel
    (step_cache is the reference's; the kernels need none)."""
    if not use_triton(query):
        return reference.paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                         query_start_loc, scale, query_lens_cpu, seq_lens_cpu,
                                         k_scale, v_scale, step_cache,
                                         native_decode=use_native(query, key_cache, value_cache) is not None
                                         and native_decode_fits(query, key_cache, value_cache, k_scale))
    q_lens = query_lens_cpu or (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    if q_lens and max(q_lens) == 1 and len(q_lens) == query.shape[0]:
        from pdserve.kernels.triton_decode_attention import choose_num_splits, paged_decode_attention
        splits = DECODE_NUM_SPLITS
        if splits is None:
            s_lens = seq_lens_cpu or seq_lens.tolist()
            splits = choose_num_splits(len(q_lens), key_cache.shape[2], max(s_lens), 64, _num_sms(query))
        return paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                      query_start_loc, scale, splits, k_scale, v_scale)
    from pdserve.kernels.triton_prefill_attention import paged_prefill_attention
    return paged_prefill_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                   query_start_loc, scale, max(q_lens, default=0), k_scale, v_scale)


def _num_sms(tensor: torch.Tensor) -> int:
    if tensor.is_cuda:
        return _cuda_sm_count(tensor.device.index or 0)
    return 4  # the interpreter on the CPU: a few splits, so tests exercise the merge


@cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
