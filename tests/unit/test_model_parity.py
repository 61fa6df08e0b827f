"""The model against `transformers` on checkpoints that transformers itself wrote."""

from __future__ import annotations

import pytest
import torch

from helpers.paged_generation import allocate_tables, greedy_paged
from pdserve.engine.model_runner import ModelRunner

PROMPT_LENS = [5, 17, 33, 2]
MAX_NEW = 64


def _prompts(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _hf_greedy(hf_model, prompt, max_new):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                min_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama_linear_mha"])
def test_batch_of_four_matches_transformers(hf_checkpoint, name):
    import transformers

    model_dir = hf_checkpoint(name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None
    runner = ModelRunner.from_dir(model_dir, num_blocks=64, block_size=16, dtype=torch.float32)
    prompts = _prompts(runner.config.vocab_size)
    tables, _ = allocate_tables(PROMPT_LENS, MAX_NEW, 16)
    prompt_logits, generated = greedy_paged(runner, prompts, MAX_NEW, tables)
    for prompt, ours_logits, ours_tokens in zip(prompts, prompt_logits, generated):
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(ours_logits, ref, atol=1e-4, rtol=0)
        assert ours_tokens == _hf_greedy(hf_model, prompt, MAX_NEW)


def test_paged_equals_contiguous(hf_checkpoint):
    model_dir = hf_checkpoint("llama")
    contiguous = ModelRunner.from_dir(model_dir, num_blocks=16, block_size=16)
    prompts = _prompts(contiguous.config.vocab_size, seed=2)
    max_new = 24
    tables, _ = allocate_tables(PROMPT_LENS, max_new, 16)
    ref_logits, ref_tokens = greedy_paged(contiguous, prompts, max_new, tables)

    tiny_blocks = ModelRunner(contiguous.model, contiguous.config, num_blocks=256, block_size=1)
    tables, _ = allocate_tables(PROMPT_LENS, max_new, 1)
    logits_bs1, tokens_bs1 = greedy_paged(tiny_blocks, prompts, max_new, tables)

    shuffled = ModelRunner(contiguous.model, contiguous.config, num_blocks=40, block_size=16)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    tables, _ = allocate_tables(PROMPT_LENS, max_new, 16, order=order)
    logits_shuf, tokens_shuf = greedy_paged(shuffled, prompts, max_new, tables)

    assert tokens_bs1 == ref_tokens and tokens_shuf == ref_tokens
    for a, b, c in zip(ref_logits, logits_bs1, logits_shuf):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)
