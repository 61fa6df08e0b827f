"""The Triton kernels at real shapes on a GPU (skipped without CUDA): Llama-3-8B attention heads
(32 query heads over 8 KV heads of 128), bf16, blocks of 16, batch 64 decode over contexts up to
4k, prefill of 4k tokens with and without a cached prefix, int8/fp8 caches.

Run: `pytest -m gpu tests/unit/test_kernels_gpu.py` (the small-shape kernel tests also run compiled on
the GPU when there is one).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from pdserve.kernels import reference
    from pdserve.kernels.kv_cache_alloc import allocate_cache
    from pdserve.kernels.triton_activation import silu_and_mul
    from pdserve.kernels.triton_decode_attention import choose_num_splits, paged_decode_attention
    from pdserve.kernels.triton_kv_write import write_kv_to_cache
    from pdserve.kernels.triton_norm import rms_norm
    from pdserve.kernels.triton_prefill_attention import paged_prefill_attention
    from pdserve.kernels.triton_rotary import apply_rotary
    from pdserve.models.config import RopeScaling
    from pdserve.models.rope import rope_cos_sin_cache

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CACHE_DTYPES = [torch.bfloat16, torch.int8, torch.float8_e4m3fn]


def filled_caches(seq_lens, cache_dtype, seed=0):
    """K/V caches holding random K/V for seq_lens (scattered blocks); (caches, tables, lens)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    counts = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(counts) + 7
    caches = [allocate_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, cache_dtype, "cuda") for _ in range(2)]
    ids = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32, device="cuda")
    slots, used = [], 0
    for row, (n, count) in enumerate(zip(seq_lens, counts)):
        tables[row, :count] = ids[used:used + count]
        used += count
        pos = torch.arange(n, device="cuda")
        slots.append(tables[row, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    slots = torch.cat(slots)
    k, v = (torch.randn(len(slots), KV_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
            for _ in range(2))
    reference.write_kv_to_cache(k, v, caches[0].data, caches[1].data, slots, caches[0].scales, caches[1].scales)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return caches, tables, lens


def assert_attention_close(got, want):
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_decode_batch_64_up_to_4k(cache_dtype):
    seq_lens = torch.randint(1, 4097, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    (kc, vc), tables, lens = filled_caches(seq_lens, cache_dtype)
    q = torch.randn(64, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q_loc = torch.arange(65, dtype=torch.int32, device="cuda")
    want = reference.paged_attention(q, kc.data, vc.data, tables, lens, q_loc, HEAD_DIM ** -0.5,
                                     k_scale=kc.scales, v_scale=vc.scales)
    for splits in (1, choose_num_splits(64, KV_HEADS, 4096, 64, 132), 8):
        got = paged_decode_attention(q, kc.data, vc.data, tables, lens, q_loc, HEAD_DIM ** -0.5, splits,
                                     kc.scales, vc.scales)
        assert_attention_close(got, want)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_prefill_4k_tokens_with_and_without_a_cached_prefix(cache_dtype):
    q_lens, seq_lens = [2048, 1024, 1000, 24], [2048, 3072, 1000, 2071]
    (kc, vc), tables, lens = filled_caches(seq_lens, cache_dtype)
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q_loc = torch.tensor([0, 2048, 3072, 4072, 4096], dtype=torch.int32, device="cuda")
    got = paged_prefill_attention(q, kc.data, vc.data, tables, lens, q_loc, HEAD_DIM ** -0.5, max(q_lens),
                                  kc.scales, vc.scales)
    want = reference.paged_attention(q, kc.data, vc.data, tables, lens, q_loc, HEAD_DIM ** -0.5, q_lens,
                                     seq_lens, kc.scales, vc.scales)
    assert_attention_close(got, want)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_kv_write_matches_reference_at_4k_tokens(cache_dtype):
    pair = [[allocate_cache(300, BLOCK_SIZE, KV_HEADS, HEAD_DIM, cache_dtype, "cuda") for _ in range(2)]
            for _ in range(2)]
    slots = (torch.randperm(300, device="cuda")[:256].repeat_interleave(16) * 16
             + torch.arange(16, device="cuda").repeat(256))
    k, v = (torch.randn(4096, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    write_kv_to_cache(k, v, pair[0][0].data, pair[0][1].data, slots, pair[0][0].scales, pair[0][1].scales)
    reference.write_kv_to_cache(k, v, pair[1][0].data, pair[1][1].data, slots, pair[1][0].scales,
                                pair[1][1].scales)
    for got, want in zip(pair[0], pair[1]):
        if want.scales is None:
            assert torch.equal(got.data, want.data)
            continue
        torch.testing.assert_close(got.scales, want.scales)
        # GPU and CPU division may round x / scale differently on a rounding boundary: at most one
        # code apart (adjacent fp8 codes of one sign are adjacent integers too), and rarely
        codes = (got.data.view(torch.int8).int() - want.data.view(torch.int8).int()).abs()
        assert int(codes.max()) <= 1 and float((codes > 0).float().mean()) < 1e-3


def test_fused_elementwise_ops_at_llama_8b_width():
    x, residual = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(rms_norm(x, weight, 1e-5, residual), reference.rms_norm(x, weight, 1e-5, residual)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    gate_up = torch.randn(512, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=2e-2, rtol=2e-2)
    table = rope_cos_sin_cache(HEAD_DIM, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), 131072).cuda()
    q = torch.randn(4096, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4096, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 131072, (4096,), device="cuda")
    for got, want in zip(apply_rotary(q, k, positions, table), reference.apply_rotary(q, k, positions, table)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
