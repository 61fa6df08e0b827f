"""The Llama-family network (Llama 2/3, Qwen2, Mistral) over a paged KV cache.

One forward takes a packed batch: any mix of prompt chunks and single decode tokens, no padding.
Projections are fused (q|k|v and gate|up) when the checkpoint is loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.kernels import ops
from pdserve.kernels.attention_metadata import AttentionMetadata
from pdserve.models.config import ModelConfig
from pdserve.models.rope import rope_cos_sin_cache

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache), each [NB, BS, KVH, D]
KVScales = tuple[torch.Tensor, torch.Tensor]  # (k_scale, v_scale) of an int8/fp8 cache, each [NB, KVH]


class Attention(nn.Module):
    """Grouped-query self-attention reading and writing K/V through the paged cache (under tensor
    parallelism: this rank's heads, the partial o_proj outputs summed over the ranks)."""

    tp = None  # the TensorParallelGroup of a sharded model (pdserve.models.tensor_parallel)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata, kv_scales: KVScales | None = None) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; stores this step's K/V before attending
        (kv_scales: the per-block scales when the cache is int8/fp8)."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = ops.apply_rotary(q, k, positions, cos_sin, meta.step_cache)
        key_cache, value_cache = kv_cache
        k_scale, v_scale = kv_scales or (None, None)
        ops.write_kv_to_cache(k, v, key_cache, value_cache, meta.slot_mapping, k_scale, v_scale)
        out = ops.paged_attention(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, self.scale, meta.query_lens_cpu,
                                  meta.seq_lens_cpu, k_scale, v_scale, meta.step_cache)
        out = self.o_proj(out.reshape(num_tokens, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (under tensor parallelism: this rank's slice
    of the intermediate features, the partial outputs summed over the ranks)."""

    tp = None  # the TensorParallelGroup of a sharded model

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        out = self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class RMSNorm(nn.Module):
    """RMSNorm whose forward also adds the residual stream (returns the new residual)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x, residual: [T, hidden] -> (normed [T, hidden], residual [T, hidden])."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: attention then MLP, residual stream carried alongside."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta, kv_scales=None):
        """x, residual: [T, hidden] -> (x, residual) for the next layer."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta, kv_scales)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family language model (also serves Qwen2 and Mistral checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer(
            "cos_sin_cache",
            rope_cos_sin_cache(config.head_dim, config.rope_theta, config.rope_scaling,
                               config.max_position_embeddings),
            persistent=False,
        )

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the checkpoint ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, layer_done=None,
                kv_scales: list[KVScales] | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden].

        layer_done(i) is called after layer i has written its K/V (the prefill server streams
        each layer's blocks while the next layer computes). It may return (rows [T'], positions
        [T'], meta): the later layers then compute only those rows of the batch, laid out as meta
        says (sequences whose requests left mid-step), and the result is [T', hidden].
        kv_scales: per layer, the scales of an int8/fp8 KV cache (None for a float cache).
        """
        x = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, kv_caches[i], meta,
                                kv_scales[i] if kv_scales is not None else None)
            narrowed = layer_done(i) if layer_done is not None else None
            if narrowed is not None:
                rows, positions, meta = narrowed
                x, residual = x[rows], residual[rows]
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()
