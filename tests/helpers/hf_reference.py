"""transformers as the reference for cluster tests: greedy continuations of token-id prompts."""

from __future__ import annotations

import torch


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int,
              gguf_file: str | None = None) -> list[list[int]]:
    """Exactly max_tokens greedy tokens per prompt (EOS ignored) from transformers, float32; `gguf_file`: load
    that GGUF file of `model_dir` instead of the directory's safetensors."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              gguf_file=gguf_file).eval()
    model.generation_config.eos_token_id = None
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(prompt):].tolist())
    return out
