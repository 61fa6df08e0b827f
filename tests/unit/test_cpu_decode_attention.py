"""The CPU decode attention (kernels/cpu_decode_attention.py) against attention computed row by
row from `gather_paged_kv`: GQA ratios, float and int8/fp8 caches, block sizes, rows of very
different lengths (several length groups), decode rows packed among prefill rows, and stale
NaN/inf in the slots and blocks a row does not own."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import reference
from pdserve.kernels.cpu_decode_attention import MAX_PADDING_FACTOR, group_rows_by_length
from pdserve.kernels.kv_cache_alloc import allocate_cache

HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5
# Lengths spanning groups: 1 token, one block, one past it, and rows 2x-6x longer.
SEQ_LENS = [1, 16, 17, 40, 100, 9, 64, 33]
CACHE_DTYPES = {"f32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
                "int8": (torch.int8, torch.float32), "fp8": (torch.float8_e4m3fn, torch.float32)}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def paged_setup(seq_lens, block_size, kv_heads, cache_dtype, seed=0):
    """K/V caches holding random K/V of every row at scattered blocks (block 0 left unused, as
    the zero padding of the tables points there); returns (key, value, tables)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + 4
    key, value = (allocate_cache(num_blocks, block_size, kv_heads, HEAD_DIM, cache_dtype, "cpu")
                  for _ in range(2))
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    slots = []
    for row, (n, count) in enumerate(zip(seq_lens, counts)):
        tables[row, :count] = torch.tensor(ids[:count], dtype=torch.int32)
        ids = ids[count:]
        slots += [int(tables[row, p // block_size]) * block_size + p % block_size for p in range(n)]
    slots = torch.tensor(slots)
    k_new = torch.randn(len(slots), kv_heads, HEAD_DIM, generator=gen)
    v_new = torch.randn(len(slots), kv_heads, HEAD_DIM, generator=gen)
    reference.write_kv_to_cache(k_new, v_new, key.data, value.data, slots, key.scales, value.scales)
    return key, value, tables


def attention_row_by_row(query, key, value, tables, seq_lens, q_lens):
    """Each row's queries (the last q_len of its seq_len tokens) over its gathered K/V, in float32."""
    out, start = [], 0
    heads, kv_heads = query.shape[1], key.data.shape[2]
    for row, (n, q_len) in enumerate(zip(seq_lens, q_lens)):
        k = reference.gather_paged_kv(key.data, tables[row], n, key.scales).float()
        v = reference.gather_paged_kv(value.data, tables[row], n, value.scales).float()
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1) for t in (k, v))
        q = query[start:start + q_len].float().transpose(0, 1)  # [H, q_len, D]
        scores = q @ k.transpose(1, 2) * SCALE
        positions = torch.arange(n - q_len, n).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(n).unsqueeze(0) > positions, float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))
        start += q_len
    return torch.cat(out)


def run(seq_lens, q_lens, block_size, heads, kv_heads, dtypes, poison=None):
    cache_dtype, q_dtype = dtypes
    key, value, tables = paged_setup(seq_lens, block_size, kv_heads, cache_dtype)
    if poison is not None:
        poison(key, value, tables)
    query = torch.randn(sum(q_lens), heads, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(q_dtype)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    got = reference.paged_attention(query, key.data, value.data, tables, torch.tensor(seq_lens),
                                    query_start_loc, SCALE, list(q_lens), list(seq_lens), key.scales,
                                    value.scales)
    want = attention_row_by_row(query, key, value, tables, seq_lens, q_lens)
    tol = TOLERANCE[q_dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize("dtypes", CACHE_DTYPES.values(), ids=CACHE_DTYPES.keys())
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1), (12, 4)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_rows_match_row_by_row_attention(dtypes, heads, kv_heads, block_size):
    run(SEQ_LENS, [1] * len(SEQ_LENS), block_size, heads, kv_heads, dtypes)


def test_decode_rows_packed_among_prefill_rows():
    """Decode rows between chunked-prefill rows: each output lands at its own row's token."""
    q_lens = [1, 5, 1, 1, 17, 1, 1, 1]
    run(SEQ_LENS[:3] + [40, 40] + SEQ_LENS[5:], q_lens, 4, 6, 2, CACHE_DTYPES["f32"])


@pytest.mark.parametrize("stale", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtypes", [CACHE_DTYPES["f32"], CACHE_DTYPES["bf16"]], ids=["f32", "bf16"])
def test_stale_non_finite_slots_do_not_leak(stale, dtypes):
    """NaN/inf left in the unused tail of each row's last block and in block 0 (where the tables'
    padding points, so the shorter rows of a group read it) change nothing."""
    block_size = 16

    def poison(key, value, tables):
        for row, n in enumerate(SEQ_LENS):
            last = int(tables[row, (n - 1) // block_size])
            for cache in (key.data, value.data):
                cache[last, n % block_size or block_size:] = stale
                cache[0] = stale

    got = run(SEQ_LENS, [1] * len(SEQ_LENS), block_size, 6, 2, dtypes, poison)
    assert torch.isfinite(got).all()


def test_rows_grouped_by_length_within_padding_bound():
    lens = [5, 300, 150, 149, 80, 1, 2, 40, 300]
    groups = group_rows_by_length(list(range(len(lens))), lens)
    assert sorted(b for g in groups for b in g) == list(range(len(lens)))
    for group in groups:
        longest = lens[group[0]]
        assert all(lens[b] <= longest and lens[b] * MAX_PADDING_FACTOR >= longest for b in group)
    assert [[lens[b] for b in g] for g in groups] == [[300, 300, 150], [149, 80], [40], [5], [2, 1]]
