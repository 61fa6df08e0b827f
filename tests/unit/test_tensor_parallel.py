"""Tensor parallelism on CPU (gloo, float32): a model split over 2 or 4 rank processes computes what the
whole model computes (issue 19's first acceptance point, at the network level)."""

from __future__ import annotations

import pytest
import torch

from helpers.tensor_parallel_ranks import sharded_greedy, whole_model_greedy
from pdserve.models.config import ModelConfig
from pdserve.models.tensor_parallel import check_splittable, kv_heads_of_rank, local_config
from pdserve.models.tiny_model import make_tiny_model

PROMPT_LENS = [5, 17, 33, 2]


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


# llama: 4 heads over 2 KV heads (at 4 ranks: fewer KV heads than ranks); qwen2: 6 over 2 with q/k/v bias and
# an untied head; mistral: one KV head (replicated on both ranks).
@pytest.mark.parametrize("name, size", [("llama", 2), ("llama", 4), ("qwen2", 2), ("mistral", 2)])
def test_sharded_prompt_logits_and_greedy_tokens_equal_the_whole_model(hf_checkpoint, tmp_path, name, size):
    model_dir = hf_checkpoint(name)
    config = ModelConfig.from_dir(model_dir)
    prompts = _prompts(config.vocab_size)
    whole_logits, whole_tokens = whole_model_greedy(model_dir, prompts, 16)
    ranks = sharded_greedy(model_dir, prompts, 16, size, tmp_path / "out")
    for rank, got in enumerate(ranks):
        assert got["kv_heads"] == local_config(config, size).num_kv_heads
        for ours, ref in zip(got["logits"], whole_logits):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        assert got["tokens"] == whole_tokens, f"rank {rank}"


def test_64_greedy_tokens_of_the_trained_model_equal_at_two_ranks(tmp_path):
    model_dir = make_tiny_model(tmp_path / "trained", size="tiny", train_steps=600)
    prompts = _prompts(ModelConfig.from_dir(model_dir).vocab_size, seed=2)
    _, whole_tokens = whole_model_greedy(model_dir, prompts, 64)
    (rank0, rank1) = sharded_greedy(model_dir, prompts, 64, 2, tmp_path / "out")
    assert rank0["tokens"] == whole_tokens and rank1["tokens"] == whole_tokens


def test_kv_heads_split_or_replicate_and_unsplittable_shapes_are_named():
    base = dict(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                num_layers=1, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4)
    gqa = ModelConfig(num_heads=8, num_kv_heads=4, **base)
    assert [list(kv_heads_of_rank(gqa, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(kv_heads_of_rank(gqa, r, 8)) for r in range(8)] == [[0], [0], [1], [1], [2], [2], [3], [3]]
    assert local_config(gqa, 8).num_kv_heads == 1 and local_config(gqa, 8).num_heads == 1
    with pytest.raises(ValueError, match="3 KV heads"):
        check_splittable(ModelConfig(num_heads=6, num_kv_heads=3, **base), 2)
    with pytest.raises(ValueError, match="8 attention heads"):
        check_splittable(gqa, 3)
    with pytest.raises(ValueError, match=">= 1"):
        check_splittable(gqa, 0)
