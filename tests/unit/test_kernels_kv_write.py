"""Triton KV write into paged slots (float, int8, fp8 caches) against the PyTorch reference,
including block-scale growth, fresh blocks, padding slots and block ids past 2**31 elements."""

from __future__ import annotations

import pytest
import torch

from helpers.kernel_testing import (  # first: sets TRITON_INTERPRET
    DEVICE,
    block_tables_for,
    paged_caches,
    slots_for,
    sparse_caches,
)
from pdserve.kernels import reference  # noqa: E402
from pdserve.kernels.triton_kv_write import write_kv_to_cache  # noqa: E402

CACHE_DTYPES = [torch.float16, torch.int8, torch.float8_e4m3fn]


def write_both(caches_pair, key, value, slots):
    """Write with the kernel into caches_pair[0] and with the reference into caches_pair[1]."""
    write_kv_to_cache(key.to(DEVICE), value.to(DEVICE), *caches_pair[0].args[:2], slots.to(DEVICE),
                      *caches_pair[0].args[2:])
    reference.write_kv_to_cache(key.to(DEVICE), value.to(DEVICE), *caches_pair[1].args[:2],
                                slots.to(DEVICE), *caches_pair[1].args[2:])


def assert_caches_equal(got, want, block_ids):
    ids = torch.tensor(block_ids, device=DEVICE)
    for g, w in ((got.key, want.key), (got.value, want.value)):
        # bytes of values and scales alike: the kernel follows the reference's rounding exactly
        assert torch.equal(g.data[ids].view(torch.uint8).cpu(), w.data[ids].view(torch.uint8).cpu())
        if w.scales is not None:
            torch.testing.assert_close(g.scales[ids].cpu(), w.scales[ids].cpu(), rtol=1e-6, atol=0)


def steps_for(seq_lens: list[int], mode: str):
    """(starts, ends) of successive steps writing every sequence: "prefill" all at once,
    "chunked" 5 tokens a step, "decode" all but the last 4 tokens and then one a step."""
    chunk = {"prefill": max(seq_lens), "chunked": 5, "decode": 1}[mode]
    done = [0] * len(seq_lens)
    if mode == "decode":
        done = [max(0, n - 4) for n in seq_lens]
        yield [0] * len(seq_lens), done
    while any(d < n for d, n in zip(done, seq_lens)):
        ends = [min(n, d + chunk) for d, n in zip(done, seq_lens)]
        yield done, ends
        done = ends


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("kv_heads", [2])
@pytest.mark.parametrize("mode", ["prefill", "chunked", "decode"])
def test_kv_write_matches_reference(dtype, block_size, kv_heads, mode):
    """Prefill, chunked prefill and decode steps over scattered blocks; each step's values grow,
    so quantized blocks regrow their scales and requantize what they hold. Decode steps cross
    block boundaries at both block sizes (positions 14..17 of the second sequence)."""
    head_dim, seq_lens = 16, [9, 18, 3]
    pair = [paged_caches(40, block_size, kv_heads, head_dim, dtype) for _ in range(2)]
    block_ids = [int(b) for b in torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    tables = block_tables_for(seq_lens, block_size, block_ids)
    gen = torch.Generator().manual_seed(2)
    for step, (starts, ends) in enumerate(steps_for(seq_lens, mode)):
        slots = slots_for(tables, starts, ends, block_size)
        growth = 1.0 + 0.5 * step
        key = torch.randn(len(slots), kv_heads, head_dim, generator=gen) * growth
        value = torch.randn(len(slots), kv_heads, head_dim, generator=gen) * growth
        write_both(pair, key, value, slots)
    assert_caches_equal(pair[0], pair[1], block_ids)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_padding_slots_are_skipped(dtype):
    pair = [paged_caches(4, 4, 2, 16, dtype) for _ in range(2)]
    slots = torch.tensor([5, 6, 7, -1, 12, 13, -1])  # padding between sequences and at the end
    gen = torch.Generator().manual_seed(3)
    key, value = torch.randn(7, 2, 16, generator=gen), torch.randn(7, 2, 16, generator=gen)
    write_both(pair, key, value, slots)
    assert_caches_equal(pair[0], pair[1], [0, 1, 2, 3])
    assert not pair[0].key.data[0].float().any()  # block 0 was never written


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_a_block_written_from_offset_zero_drops_its_old_scale(dtype):
    """A freed block reused by another sequence starts afresh, not at the old (larger) scale."""
    caches = paged_caches(2, 4, 1, 16, dtype)
    gen = torch.Generator().manual_seed(4)
    for magnitude in (100.0, 1.0):
        key = torch.randn(3, 1, 16, generator=gen) * magnitude
        write_kv_to_cache(key.to(DEVICE), key.to(DEVICE), *caches.args[:2],
                          torch.tensor([4, 5, 6], device=DEVICE), *caches.args[2:])
    qmax = 127 if dtype == torch.int8 else 448
    assert float(caches.key.scales[1, 0]) == pytest.approx(float(key.abs().max()) / qmax)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_kv_write_to_block_ids_past_2_31_elements(tmp_path, dtype):
    """Block ids whose offsets need 64 bits (see kernel_testing.sparse_caches)."""
    block_size, heads, head_dim = 4, 2, 16
    pair, first = zip(*(sparse_caches(tmp_path / name, 0, 6, block_size, heads, head_dim, dtype)
                        for name in ("kernel", "reference")))
    assert first[0] == first[1]
    block_ids = [first[0] + i for i in (5, 0, 3)]
    tables = block_tables_for([7, 4], block_size, block_ids)
    gen = torch.Generator().manual_seed(5)
    for starts, ends in steps_for([7, 4], "decode"):
        slots = slots_for(tables, starts, ends, block_size)
        key, value = (torch.randn(len(slots), heads, head_dim, generator=gen) for _ in range(2))
        write_both(pair, key, value, slots)
    assert_caches_equal(pair[0], pair[1], block_ids)
    assert pair[0].key.data[block_ids[0]].float().abs().sum() > 0
