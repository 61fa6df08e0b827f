"""Test helper: greedy decoding straight over ModelRunner with a hand-made block allocation."""

from __future__ import annotations

import torch

from pdserve.engine.model_runner import ModelRunner, ScheduledChunk


def allocate_tables(prompt_lens, max_new, block_size, order=None):
    """Block tables for each prompt's prompt+max_new tokens, drawn from `order` (a permutation
    of physical block ids) or 0.. in sequence."""
    tables, next_block = [], 0
    for n in prompt_lens:
        count = (n + max_new + block_size - 1) // block_size
        ids = range(next_block, next_block + count)
        tables.append([order[i] if order is not None else i for i in ids])
        next_block += count
    return tables, next_block


def greedy_paged(runner: ModelRunner, prompts, max_new: int, tables):
    """Run all prompts together: one packed prefill step, then batched decode steps.

    Returns (prompt_logits: list of [len, V] tensors, generated: list of token-id lists).
    """
    prefill = [ScheduledChunk(i, list(p), 0, tables[i], True) for i, p in enumerate(prompts)]
    batch = runner.prepare(prefill)
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
        all_logits = runner.model.compute_logits(hidden)
    bounds = batch.meta.query_start_loc.tolist()
    prompt_logits = [all_logits[bounds[i]:bounds[i + 1]] for i in range(len(prompts))]
    generated = [[int(l[-1].argmax())] for l in prompt_logits]
    for _ in range(max_new - 1):
        chunks = [ScheduledChunk(i, [generated[i][-1]], len(p) + len(generated[i]) - 1, tables[i], True)
                  for i, p in enumerate(prompts)]
        logits = runner.execute(chunks)
        for i, row in enumerate(logits):
            generated[i].append(int(row.argmax()))
    return prompt_logits, generated
