"""Attention parts of the kernel benchmark (services/bench/kernel_bench.py): paged decode at batch
64 x 4k context against SDPA on the same K/V gathered into contiguous tensors, and prefill of 4k
tokens against SDPA's flash backend. Llama-3-8B attention shape: 32 query heads over 8 KV heads
of 128, bf16, blocks of 16 tokens."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


@dataclass
class PagedSetup:
    """Caches filled for `num_seqs` sequences of `context` tokens on scattered blocks."""

    key: object  # pdserve.kernels.kv_cache_alloc.CacheTensors
    value: object
    tables: torch.Tensor  # [B, blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    kv_bytes: int  # bytes of K and V (values and scales) the sequences hold


def paged_setup(num_seqs: int, context: int, cache_dtype: torch.dtype) -> PagedSetup:
    """Random K/V for every position, written by the reference op (quantizing for int8/fp8)."""
    from pdserve.kernels import reference
    from pdserve.kernels.kv_cache_alloc import allocate_cache, cache_block_bytes

    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    key, value = (allocate_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, cache_dtype, "cuda")
                  for _ in range(2))
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(num_seqs, blocks_per_seq)
    pos = torch.arange(context, device="cuda")
    for row in range(num_seqs):  # one sequence at a time keeps the bf16 staging small
        slots = tables[row, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = (torch.randn(context, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        reference.write_kv_to_cache(k, v, key.data, value.data, slots, key.scales, value.scales)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * num_blocks * cache_block_bytes(BLOCK_SIZE, KV_HEADS, HEAD_DIM, cache_dtype)
    return PagedSetup(key, value, tables, seq_lens, kv_bytes)


def gathered(setup: PagedSetup, cache, num_seqs: int, context: int) -> torch.Tensor:
    """One cache's K (or V) of every sequence, contiguous [B, KVH, context, D] bf16 (dequantized)."""
    from pdserve.kernels.reference import gather_paged_kv

    rows = [gather_paged_kv(cache.data, setup.tables[b], context, cache.scales).to(torch.bfloat16)
            for b in range(num_seqs)]
    return torch.stack(rows).transpose(1, 2).contiguous()


def bench_ms(fn, do_bench) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: warm-up, L2 flush between runs)."""
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def decode_attention(do_bench, batch: int = 64, context: int = 4096, sweep: bool = False) -> dict:
    """Paged decode attention, bf16/int8/fp8 caches, against SDPA over gathered bf16 K/V."""
    from pdserve.kernels.ops import _num_sms
    from pdserve.kernels.triton_decode_attention import choose_num_splits, paged_decode_attention

    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    results: dict = {"batch": batch, "context": context}
    for cache_dtype in (torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        setup = paged_setup(batch, context, cache_dtype)
        splits = choose_num_splits(batch, KV_HEADS, context, 64, _num_sms(q))
        configs = [dict(num_splits=splits)]
        if sweep:
            configs = [dict(num_splits=s, block_n=n, num_warps=w, num_stages=st) for s, n, w, st in
                       itertools.product(sorted({1, 2, splits}), (32, 64, 128), (4, 8), (2, 3))]
        timings = []
        for config in configs:
            def run(config=config):
                paged_decode_attention(q, setup.key.data, setup.value.data, setup.tables, setup.seq_lens,  # noqa: F821 (del is after)
                                       q_loc, scale, k_scale=setup.key.scales, v_scale=setup.value.scales,  # noqa: F821
                                       **config)
            timings.append((bench_ms(run, do_bench), config))
        ms, best = min(timings, key=lambda t: t[0])
        name = str(cache_dtype).removeprefix("torch.")
        results[name] = {"ms": ms, "config": best, "kv_bytes": setup.kv_bytes,
                         "gb_per_s": setup.kv_bytes / ms / 1e6}
        if cache_dtype == torch.bfloat16:
            k = gathered(setup, setup.key, batch, context)
            v = gathered(setup, setup.value, batch, context)
            q4 = q.unsqueeze(2)  # [B, H, 1, D]
            results["sdpa_gathered_ms"] = bench_ms(
                lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True), do_bench)
            del k, v
        del setup
        torch.cuda.empty_cache()
    return results


def prefill_attention(do_bench, tokens: int = 4096, sweep: bool = False) -> dict:
    """One 4k-token prompt through the paged prefill kernel (K/V already in the cache, as in the
    model) against SDPA flash (is_causal) on contiguous K/V repeated to every query head."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pdserve.kernels.triton_prefill_attention import paged_prefill_attention

    setup = paged_setup(1, tokens, torch.bfloat16)
    q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q_loc = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    configs = [dict()]  # the wrapper's defaults
    if sweep:
        configs += [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in
                    itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))]
    timings = []
    for config in configs:
        def run(config=config):
            paged_prefill_attention(q, setup.key.data, setup.value.data, setup.tables, setup.seq_lens, q_loc,
                                    scale, tokens, **config)
        try:
            timings.append((bench_ms(run, do_bench), config))
        except Exception as exc:  # noqa: BLE001 -- a sweep config may not fit in shared memory
            print(f"  prefill config {config} failed: {type(exc).__name__}: {exc}")
    ms, best = min(timings, key=lambda t: t[0])
    k = gathered(setup, setup.key, 1, tokens).repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = gathered(setup, setup.value, 1, tokens).repeat_interleave(HEADS // KV_HEADS, dim=1)
    q4 = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, D]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=scale),
                           do_bench)
    return {"tokens": tokens, "ms": ms, "config": best, "sdpa_flash_ms": sdpa_ms}
