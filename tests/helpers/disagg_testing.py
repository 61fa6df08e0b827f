"""Helpers for the disaggregation tests: a stand-in KV transfer between two engines' caches,
prefill on one engine, and folding outputs per sample."""

from __future__ import annotations

from helpers.engine_testing import BLOCK_SIZE, greedy
from pdserve.engine.chunk_info import ChunkInfo
from pdserve.engine.outputs import GenerationResult
from pdserve.engine.prefilled import finish_reason_after, first_token_params
from pdserve.models.sampling_params import SamplingParams


def kv_copier(src, dst, request_id: str, dst_block_ids: list[int], seen: list | None = None, held_blocks: int = 0):
    """A layer hook for engine src that copies layer i of request_id's prompt blocks into
    dst's blocks dst_block_ids (same logical order), as the prefill server's sender would: all
    but the first held_blocks, which dst holds already."""
    def hook(layer: int, infos: list[ChunkInfo]) -> None:
        for info in infos:
            if info.request_id != request_id:
                continue
            if seen is not None:
                seen.append((layer, info))
            first = 0 if info.cached_block_ids else info.first_block_index
            src_ids = list(info.cached_block_ids) + list(info.block_ids)
            skipped = max(0, min(held_blocks - first, len(src_ids)))
            first, src_ids = first + skipped, src_ids[skipped:]
            if not src_ids:
                continue
            dst_ids = dst_block_ids[first:first + len(src_ids)]
            for src_cache, dst_cache in zip(src.runner.kv_caches[layer], dst.runner.kv_caches[layer]):
                dst_cache[dst_ids] = src_cache[src_ids].to(dst_cache.device)
    return hook


def prefill(a, b, request_id: str, prompt: list[int], params: SamplingParams, dst_block_ids: list[int],
            held_blocks: int = 0):
    """Run the prompt on engine a up to the first token, streaming its KV into b's blocks (all but
    the first held_blocks); returns {sample index: (first token, finish reason under the request's
    own params)}."""
    a.add_request(request_id, prompt, first_token_params(params))
    hook = kv_copier(a, b, request_id, dst_block_ids, held_blocks=held_blocks)
    firsts = {}
    while a.has_unfinished_requests():
        for out in a.step(layer_hook=hook):
            for s in out.samples:
                firsts[s.index] = (s.token_ids[0], finish_reason_after(a, prompt, params, s.token_ids))
    return firsts


Samples = dict[int, tuple[list[int], str, str | None]]  # index -> (token ids, text, finish reason)


def fold(results: dict[str, Samples], outputs) -> None:
    """Add step outputs to results[request_id][sample index]."""
    for out in outputs:
        samples = results.setdefault(out.request_id, {})
        for s in out.samples:
            tokens, text, _ = samples.get(s.index, ([], "", None))
            samples[s.index] = (tokens + s.token_ids, text + s.text, s.finish_reason)


def drain(engine, results: dict[str, Samples] | None = None) -> dict[str, Samples]:
    """Step until idle, folding every output into results."""
    results = {} if results is None else results
    while engine.has_unfinished_requests():
        fold(results, engine.step())
    return results


def with_first(first: dict[int, int], samples: Samples) -> Samples:
    """Prepend each sample's first token (sent by the prefill side) to its token ids."""
    return {i: ([first[i]] + tokens, text, reason) for i, (tokens, text, reason) in samples.items()}


def disaggregated(tiny, prompt, params):
    """The request prefilled on A and decoded on B: (samples, A, B)."""
    a = tiny.engine(max_num_batched_tokens=16)  # chunked prefill on A
    b = tiny.engine()
    block_ids = b.reserve("res-1", len(prompt))
    assert len(block_ids) == -(-len(prompt) // BLOCK_SIZE)
    stats = b.stats()
    assert (stats.num_reservations, stats.num_blocks_reserved) == (1, len(block_ids))
    assert stats.num_blocks_free == stats.num_blocks_total - len(block_ids)
    firsts = prefill(a, b, "r", prompt, params, block_ids)
    indices = sorted(firsts)
    b.add_prefilled_request("r", prompt, params, [[firsts[i][0]] for i in indices], indices,
                            reservation_id="res-1", cached_tokens=3)
    assert b.stats().num_reservations == 0 and b.stats().num_blocks_reserved == 0
    outputs = b.step()
    assert all(out.cached_tokens == 3 for out in outputs)
    results: dict[str, Samples] = {}
    fold(results, outputs)
    drain(b, results)
    assert b.stats().counters.num_prefill_tokens_computed == 0  # B computed no prompt token
    for i in indices:  # a sample the first token finished ends at once on B, with no new token
        if firsts[i][1] is not None:
            assert results["r"][i][0] == [] and results["r"][i][2] == firsts[i][1]
    return with_first({i: firsts[i][0] for i in indices}, results["r"]), a, b


def as_dict(result: GenerationResult, indices=None) -> Samples:
    """A GenerationResult's samples as Samples."""
    indices = range(len(result.samples)) if indices is None else indices
    return {i: (result.samples[i].token_ids, result.samples[i].text, result.samples[i].finish_reason)
            for i in indices}


PARAMS = {
    "greedy": greedy(12),
    "greedy-n3": greedy(10, n=3),
    "seeded": SamplingParams(max_tokens=12, temperature=0.9, seed=77, ignore_eos=True),
    "seeded-n3": SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=5, n=3,
                                ignore_eos=True, presence_penalty=0.5),
}
