"""Model configuration read from a Hugging Face `config.json`, validated with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdserve.models.errors import ModelLoadError

__all__ = ["DTYPES", "ModelConfig", "ModelLoadError", "RopeScaling"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (`rope_scaling` in config.json)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # rope_type "frequency_divisors" (GGUF files' `rope_freqs` tensor): inv_freq[i] / divisors[i]
    divisors: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Llama-family checkpoint, as the network and the KV cache need it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's own dtype (what `torch_dtype` names)."""
        return DTYPES[self.torch_dtype]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read and validate `<model_dir>/config.json`."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: no config.json in the model directory")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        """Build a config from the parsed JSON; `source` names the file in error messages."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architectures={archs!r} is not supported; "
                f"pdserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str, kind: type = int):
            if key not in raw or raw[key] is None:
                raise ModelLoadError(f"{source}: missing required key '{key}'")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ModelLoadError(f"{source}: '{key}' must be a positive integer, got {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or value <= 0):
                raise ModelLoadError(f"{source}: '{key}' must be a positive number, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        if not raw.get("head_dim") and hidden % heads:
            raise ModelLoadError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise ModelLoadError(f"{source}: torch_dtype={dtype!r} is not one of {sorted(DTYPES)}")
        # transformers 4 writes `rope_scaling` + `rope_theta`; transformers 5 one `rope_parameters`.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelLoadError(f"{source}: 'rope_scaling' must be an object, got {rope!r}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings") or 4096,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0),
            rope_scaling=_parse_rope_scaling(rope, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            torch_dtype=dtype,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _parse_rope_scaling(raw: dict, source: str) -> RopeScaling:
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope_scaling type {rope_type!r} is not supported ({', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw.get("factor", 1.0)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
