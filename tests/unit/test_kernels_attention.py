"""Triton paged attention (split-K decode, varlen causal prefill over paged K/V) against the
PyTorch reference: GQA ratios, block sizes, contexts crossing block boundaries, chunked prefill
with a cached prefix, float/int8/fp8 caches, block ids past 2**31 elements."""

from __future__ import annotations

import pytest
import torch

from helpers.kernel_testing import (  # first: sets TRITON_INTERPRET
    DEVICE,
    assert_close,
    block_tables_for,
    fill_caches,
    paged_caches,
    sparse_caches,
)
from pdserve.kernels import reference  # noqa: E402
from pdserve.kernels.triton_decode_attention import choose_num_splits, paged_decode_attention  # noqa: E402
from pdserve.kernels.triton_prefill_attention import paged_prefill_attention  # noqa: E402

HEAD_DIM = 16
GQA = [(4, 4), (4, 2), (6, 2), (8, 1)]  # (query heads, KV heads): MHA, GQA 2, GQA 3 (not 2**k), MQA
# (cache dtype, query dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16),
          (torch.int8, torch.float32), (torch.float8_e4m3fn, torch.float32)]
DTYPE_IDS = ["f32", "f16", "int8", "fp8"]


def setup(seq_lens, block_size, kv_heads, cache_dtype, seed=0, num_blocks=None, sparse_dir=None):
    """Caches filled for seq_lens with scattered block ids; returns (caches, tables on DEVICE)."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-n // block_size) for n in seq_lens)
    if sparse_dir is None:
        num_blocks = num_blocks or needed + 3
        caches, first = paged_caches(num_blocks, block_size, kv_heads, HEAD_DIM, cache_dtype), 0
    else:
        num_blocks = needed + 3
        caches, first = sparse_caches(sparse_dir, 0, num_blocks, block_size, kv_heads, HEAD_DIM, cache_dtype)
    ids = [first + int(b) for b in torch.randperm(num_blocks, generator=gen)]
    tables = block_tables_for(seq_lens, block_size, ids)
    fill_caches(caches, tables, seq_lens, block_size, gen)
    return caches, tables.to(DEVICE)


def queries(num_tokens, heads, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, heads, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)


def int_tensor(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def cumulative(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def run_decode(seq_lens, block_size, heads, kv_heads, dtypes, splits, sparse_dir=None):
    cache_dtype, q_dtype = dtypes
    caches, tables = setup(seq_lens, block_size, kv_heads, cache_dtype, sparse_dir=sparse_dir)
    q = queries(len(seq_lens), heads, q_dtype)
    lens, q_loc = int_tensor(seq_lens), int_tensor(list(range(len(seq_lens) + 1)))
    k, v, k_scale, v_scale = caches.args
    got = paged_decode_attention(q, k, v, tables, lens, q_loc, HEAD_DIM ** -0.5, splits, k_scale, v_scale,
                                 block_n=16)
    want = reference.paged_attention(q, k, v, tables, lens, q_loc, HEAD_DIM ** -0.5, k_scale=k_scale,
                                     v_scale=v_scale)
    assert_close(got, want, q_dtype)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size,splits", [(4, 3), (16, 1)])
def test_decode_attention_matches_reference(dtypes, heads, kv_heads, block_size, splits):
    """Contexts of 1 token, exactly one block, one past a block, and several blocks with a
    partial last one (tiles of 16 keys span 4 blocks of 4, or one of 16); 3 splits leave some
    splits of the short contexts empty and exercise the merge."""
    run_decode([1, block_size, block_size + 1, 37], block_size, heads, kv_heads, dtypes, splits)


def run_prefill(q_lens, seq_lens, block_size, heads, kv_heads, dtypes, sparse_dir=None):
    cache_dtype, q_dtype = dtypes
    caches, tables = setup(seq_lens, block_size, kv_heads, cache_dtype, sparse_dir=sparse_dir)
    q = queries(sum(q_lens), heads, q_dtype)
    lens, q_loc = int_tensor(seq_lens), int_tensor(cumulative(q_lens))
    k, v, k_scale, v_scale = caches.args
    got = paged_prefill_attention(q, k, v, tables, lens, q_loc, HEAD_DIM ** -0.5, max(q_lens), k_scale,
                                  v_scale, block_m=16, block_n=16)
    want = reference.paged_attention(q, k, v, tables, lens, q_loc, HEAD_DIM ** -0.5, q_lens, seq_lens,
                                     k_scale, v_scale)
    assert_close(got, want, q_dtype)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_prefill_attention_matches_reference(dtypes, heads, kv_heads):
    """Whole prompts (q_len = seq_len) of 1, 7 and 19 tokens in blocks of 4: several query
    tiles each, key tiles spanning 4 blocks."""
    run_prefill([1, 7, 19], [1, 7, 19], 4, heads, kv_heads, dtypes)


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2]], ids=["f32", "int8"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_attention_with_larger_blocks_matches_reference(dtypes, block_size):
    """Blocks of one key tile and of two (a tile reads half a block)."""
    run_prefill([3, 19, 40], [3, 19, 40], block_size, 4, 2, dtypes)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_over_a_cached_prefix_matches_reference(dtypes, block_size):
    """A mixed step: a chunk after a 15-token prefix, a chunk starting mid-block, a decode row,
    and a prefix-cache hit whose cached part is whole blocks (GQA 3)."""
    run_prefill([6, 9, 1, 5], [21, 12, 33, 5 + 2 * block_size], block_size, 6, 2, dtypes)


@pytest.mark.parametrize("dtypes", [DTYPES[1], DTYPES[2]], ids=["f16", "int8"])
def test_decode_attention_with_block_ids_past_2_31_elements(tmp_path, dtypes):
    run_decode([3, 9], 4, 4, 2, dtypes, 2, sparse_dir=tmp_path)


@pytest.mark.parametrize("dtypes", [DTYPES[1], DTYPES[2]], ids=["f16", "int8"])
def test_prefill_attention_with_block_ids_past_2_31_elements(tmp_path, dtypes):
    run_prefill([5, 3], [5, 10], 4, 4, 2, dtypes, sparse_dir=tmp_path)


def test_quantized_attention_needs_scales():
    caches, tables = setup([3], 4, 1, torch.int8)
    q = queries(1, 2, torch.float32)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        paged_decode_attention(q, caches.key.data, caches.value.data, tables, int_tensor([3]),
                               int_tensor([0, 1]), 0.25)


def test_num_splits_fill_the_gpu_but_keep_splits_long():
    assert choose_num_splits(64, 8, 4096, 64, 132) == 1  # 512 programs already
    assert choose_num_splits(1, 8, 4096, 64, 132) == 16  # 33 wanted, 16 tiles of 4 * 64
    assert choose_num_splits(1, 8, 100, 64, 132) == 1
