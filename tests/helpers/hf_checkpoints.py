"""Small checkpoints written by `transformers` itself (the correctness reference), one per
architecture feature the loader must handle."""

from __future__ import annotations

import torch

HF_CONFIGS = {
    # GQA (4 query heads over 2 KV heads), llama3 rope scaling, tied embeddings.
    "llama": dict(
        cls="LlamaConfig", vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # q/k/v bias, MHA-free GQA 6:2, untied head.
    "qwen2": dict(
        cls="Qwen2Config", vocab_size=400, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
    ),
    # MQA (one KV head), linear rope scaling is a Llama feature: mistral keeps plain rope.
    "mistral": dict(
        cls="MistralConfig", vocab_size=352, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5, rope_theta=10000.0,
    ),
    # MHA with linear rope scaling.
    "llama_linear_mha": dict(
        cls="LlamaConfig", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}


def write_hf_checkpoint(out_dir, name: str, seed: int = 0, dtype=torch.float32, **save_kwargs):
    """Random weights from `transformers` itself, saved with save_pretrained (safetensors)."""
    import transformers

    spec = dict(HF_CONFIGS[name])
    config = getattr(transformers, spec.pop("cls"))(**spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # wider weights than HF's 0.02 init, so greedy picks are not near-ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
            else:
                param.normal_(1.0 if param.abs().mean() > 0.5 else 0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir
