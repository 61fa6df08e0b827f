"""Triton RMSNorm (+ residual), SiLU-and-mul and rotary embedding against the PyTorch reference
(under the Triton interpreter on the CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from helpers.kernel_testing import DEVICE, assert_close  # first: sets TRITON_INTERPRET
from pdserve.kernels import reference  # noqa: E402
from pdserve.kernels.triton_activation import silu_and_mul  # noqa: E402
from pdserve.kernels.triton_norm import rms_norm  # noqa: E402
from pdserve.kernels.triton_rotary import apply_rotary  # noqa: E402
from pdserve.models.config import RopeScaling  # noqa: E402
from pdserve.models.rope import rope_cos_sin_cache  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, hidden, with_residual):
    x, weight = randn(7, hidden, dtype=dtype), randn(hidden, dtype=dtype, seed=1)
    residual = randn(7, hidden, dtype=dtype, seed=2) if with_residual else None
    got, got_residual = rms_norm(x, weight, 1e-5, residual)
    want, want_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got, want, dtype)
    assert_close(got_residual, want_residual, dtype)


def test_rms_norm_rejects_a_3d_input():
    with pytest.raises(ValueError, match=r"\[T, hidden\]"):
        rms_norm(randn(2, 3, 8), randn(8), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 80])
def test_silu_and_mul_matches_reference(dtype, inter):
    gate_up = randn(5, 2 * inter, dtype=dtype)
    got = silu_and_mul(gate_up)
    assert got.shape == (5, inter)
    assert_close(got, reference.silu_and_mul(gate_up), dtype)


def test_silu_and_mul_rejects_an_odd_width():
    with pytest.raises(ValueError, match="2\\*I"):
        silu_and_mul(randn(2, 7))


ROPES = {
    "default": RopeScaling(),
    "linear": RopeScaling("linear", 2.0),
    "llama3": RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_reference_on_strided_qkv(rope, heads, kv_heads, dtype):
    head_dim, tokens = 16, 6
    table = rope_cos_sin_cache(head_dim, 10000.0, ROPES[rope], 4096).to(DEVICE)
    # q and k as the model has them: views into one fused qkv projection
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 63, 64, 700, 4095], device=DEVICE)  # around llama3's band edges
    got_q, got_k = apply_rotary(q, k, positions, table)
    want_q, want_k = reference.apply_rotary(q, k, positions, table)
    assert_close(got_q, want_q, dtype)
    assert_close(got_k, want_k, dtype)
