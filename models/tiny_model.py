"""Write small random-weight Hugging Face checkpoints (Llama, Qwen2, Mistral) for tests and demos.

`make_tiny_model(out_dir, arch, seed, size)` writes a directory that `transformers` loads as is:
config.json, model.safetensors (HF key names), tokenizer.json (a byte-level BPE trained on
`models/data/corpus.txt`), tokenizer_config.json and generation_config.json.  The same arguments
always give byte-identical files; the tokenizer depends only on `size`, the weights on `seed` too.
With `train_steps` > 0 the random weights are then briefly trained on the start of the corpus
(`models/tiny_model_train.py`), which gives peaked, real-model-like next-token distributions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as BackendTokenizer

from pdserve.models.config import ModelConfig
from pdserve.models.tiny_model_train import train_weights, training_tokens
from pdserve.models.tiny_tokenizer_train import (
    BOS_TOKEN,
    EOS_TOKEN,
    tokenizer_config,
    train_tokenizer_json,
)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SIZES = ("tiny", "small", "base")
VOCAB_SIZES = {"tiny": 512, "small": 1024, "base": 2048}
MAX_POSITION_EMBEDDINGS = 4096

# Init scales chosen so that random-weight greedy decoding depends on context and position instead
# of repeating one token.  Linear layers use std = gain / sqrt(fan_in), so activations and attention
# logits (std ~ PROJ_GAIN**2) keep the same scale at every size; the usual std 0.02 would make
# attention uniform.  A small tied embedding keeps the residual stream from echoing the input token.
EMBED_GAIN = 2.5  # embedding std = EMBED_GAIN / sqrt(hidden_size)
PROJ_GAIN = 1.2
RESIDUAL_GAIN = 3.0  # o_proj and down_proj, which write into the residual stream
LM_HEAD_GAIN = 4.0
NORM_NOISE_STD = 0.1
BIAS_STD = 0.1


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one architecture at one size preset."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        """Per-head width: hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads


SHAPES: dict[tuple[str, str], ModelShape] = {
    ("llama", "tiny"): ModelShape(128, 2, 4, 2, 256),
    ("qwen2", "tiny"): ModelShape(96, 3, 6, 2, 192),
    ("mistral", "tiny"): ModelShape(128, 2, 8, 2, 320),
    ("llama", "small"): ModelShape(256, 4, 8, 2, 768),
    ("qwen2", "small"): ModelShape(256, 4, 16, 4, 704),
    ("mistral", "small"): ModelShape(256, 4, 8, 4, 768),
    ("llama", "base"): ModelShape(768, 12, 12, 4, 3072),
    ("qwen2", "base"): ModelShape(768, 12, 12, 2, 3072),
    ("mistral", "base"): ModelShape(768, 12, 12, 4, 3072),
}


def _llama3_rope_scaling() -> dict:
    """Llama-3 rope scaling with a small original context so that scaling changes positions >= 64."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }


def build_config(arch: str, size: str, vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    """The config.json contents for `arch` at `size` (legacy `rope_theta`/`rope_scaling` fields)."""
    shape = SHAPES[(arch, size)]
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(
            rope_theta=500000.0, rope_scaling=_llama3_rope_scaling(), tie_word_embeddings=True,
            attention_bias=False, mlp_bias=False, pretraining_tp=1,
        )
    elif arch == "qwen2":  # Qwen2 always has q/k/v biases; its config has no attention_bias field
        config.update(
            rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=None,
            max_window_layers=shape.num_hidden_layers,
        )
    else:  # mistral
        config.update(rope_theta=1000000.0, sliding_window=None)
    return config


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    """A float32 tensor of `shape` drawn from N(mean, std^2) with `gen`."""
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def _linear(gen: torch.Generator, out_features: int, in_features: int, gain: float = PROJ_GAIN) -> torch.Tensor:
    """A `[out_features, in_features]` weight with std gain / sqrt(in_features)."""
    return _normal(gen, (out_features, in_features), gain / in_features**0.5)


def build_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face key names for `config`, drawn in a fixed order from `seed`.

    Linear weights are `[out_features, in_features]`; q/k/v biases (qwen2) are `[out_features]`.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    inter = config["intermediate_size"]
    has_qkv_bias = config["model_type"] == "qwen2"
    weights = {"model.embed_tokens.weight": _normal(gen, (vocab, hidden), EMBED_GAIN / hidden**0.5)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        for name, out_dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            weights[f"{prefix}.self_attn.{name}.weight"] = _linear(gen, out_dim, hidden)
            if has_qkv_bias:
                weights[f"{prefix}.self_attn.{name}.bias"] = _normal(gen, (out_dim,), BIAS_STD)
        weights[f"{prefix}.self_attn.o_proj.weight"] = _linear(gen, hidden, q_dim, RESIDUAL_GAIN)
        weights[f"{prefix}.mlp.gate_proj.weight"] = _linear(gen, inter, hidden)
        weights[f"{prefix}.mlp.up_proj.weight"] = _linear(gen, inter, hidden)
        weights[f"{prefix}.mlp.down_proj.weight"] = _linear(gen, hidden, inter, RESIDUAL_GAIN)
        weights[f"{prefix}.input_layernorm.weight"] = _normal(gen, (hidden,), NORM_NOISE_STD, 1.0)
        weights[f"{prefix}.post_attention_layernorm.weight"] = _normal(gen, (hidden,), NORM_NOISE_STD, 1.0)
    weights["model.norm.weight"] = _normal(gen, (hidden,), NORM_NOISE_STD, 1.0)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = _linear(gen, vocab, hidden, LM_HEAD_GAIN)
    return weights


def _write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_args(arch: str, seed: int, size: str, train_steps: int, tokenizer_size: str | None) -> None:
    """Raise ValueError naming the bad argument."""
    if tokenizer_size is not None and tokenizer_size not in SIZES:
        raise ValueError(f"unknown tokenizer_size {tokenizer_size!r}; expected one of {list(SIZES)}")
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise ValueError(f"train_steps must be an int >= 0, got {train_steps!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, size: str = "tiny",
                    train_steps: int = 0, tokenizer_size: str | None = None, copy_training: bool = False) -> Path:
    """Write a random-weight `arch` checkpoint of preset `size` into `out_dir` and return its path.

    arch: "llama" | "qwen2" | "mistral"; size: "tiny" (fast on CPU) | "small" | "base" (~100M params).
    train_steps > 0: then train the weights that many AdamW steps (seeded by `seed`, one torch
    thread) on the first `tiny_model_train.TRAIN_TEXT_TOKENS` tokens of the corpus, which the
    model learns by heart; prompts of a dozen or more tokens from that text continue it with
    peaked distributions. Deterministic on a given machine and torch build (float rounding may
    differ elsewhere). tiny: 600 steps take ~20 s on one busy CPU core. 0 (default): random weights.
    tokenizer_size: use that size's tokenizer instead of this size's own (e.g. "small" for a "tiny" draft
    model of a "small" one: drafts must share the model's tokenizer). copy_training: half of the training
    windows also teach copying a passage from the context (as real models do; what prompt lookup relies on).
    Existing files of the same names in `out_dir` are overwritten.
    """
    _check_args(arch, seed, size, train_steps, tokenizer_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = train_tokenizer_json(VOCAB_SIZES[tokenizer_size or size])
    tokenizer = BackendTokenizer.from_str(tokenizer_json)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    config = build_config(arch, size, tokenizer.get_vocab_size(with_added_tokens=True), bos_id, eos_id)

    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config(config["max_position_embeddings"]))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    weights = build_weights(config, seed)
    if train_steps:
        separator = tokenizer.encode("\n\n", add_special_tokens=False).ids if copy_training else None
        weights, _ = train_weights(weights, ModelConfig.from_dict(config), training_tokens(tokenizer),
                                   train_steps, seed, separator)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
