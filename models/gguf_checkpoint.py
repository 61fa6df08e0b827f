"""Read a llama.cpp GGUF file: the model's configuration, and its tensors dequantized under Hugging Face names.

A GGUF file carries what a Hugging Face directory spreads over config.json, the tokenizer files and the
safetensors shards: hyperparameters and the tokenizer as metadata (`llama.*`, `qwen2.*`, `tokenizer.*`),
and every tensor in one of ggml's block formats. pdserve dequantizes each tensor to float32 as it loads it
(with the `gguf` package's own block decoders) and the loader casts it to the serving dtype, so nothing stays
quantized: the model takes the memory of its dense weights in that dtype (2 bytes per parameter in bf16).

llama.cpp's converter reorders the rows of q_proj and k_proj of Llama-architecture models (Hugging Face's
rotate-half rotary layout becomes ggml's interleaved one); `tensors` undoes that, so the network sees the
Hugging Face layout. Qwen2 files are written unpermuted.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdserve.models.config import ModelConfig, ModelLoadError, RopeScaling
from pdserve.models.gguf_metadata import TensorInfo, read_gguf_header

# general.architecture -> the Hugging Face architecture pdserve runs it as
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The formats the issue promises, plus Q5_0/Q5_1, which llama.cpp's K-quant mixes use for rows that
# are not a multiple of 256 wide.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# ggml tensor name (inside blk.N.) -> Hugging Face module path inside model.layers.N.
_LAYER_MODULES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"


class GGUFCheckpoint:
    """One GGUF file, memory-mapped: its metadata, the ModelConfig it describes and its tensors."""

    def __init__(self, path: str | Path) -> None:
        """Open `path` and read its header (tensor data is read only when `tensors` runs)."""
        self.path = Path(path)
        self.header = read_gguf_header(self.path)
        self._tensors = self.header.tensors

    def field(self, key: str, default: Any = None) -> Any:
        """The metadata value under `key` (a str, number, bool or list), or `default` when absent."""
        return self.header.metadata.get(key, default)

    @cached_property
    def architecture(self) -> str:
        """`general.architecture` ("llama", "qwen2"); ModelLoadError for any other."""
        arch = self.field("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"{self.path}: general.architecture={arch!r} is not supported; pdserve serves "
                                 f"GGUF files of {', '.join(GGUF_ARCHITECTURES)}")
        return arch

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    @cached_property
    def model_config(self) -> ModelConfig:
        """The network's configuration from the `{arch}.*` metadata and the tensors present."""
        arch = self.architecture
        heads = self._arch_field("attention.head_count")
        kv_heads = self._arch_field("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ModelLoadError(f"{self.path}: per-layer {arch}.attention.head_count_kv is not supported")
        embed = self._tensors.get("token_embd.weight")
        vocab = self._arch_field("vocab_size") or len(self.field("tokenizer.ggml.tokens", [])) or (
            embed.shape[0] if embed is not None else None)
        raw = {
            "architectures": [GGUF_ARCHITECTURES[arch]],
            "vocab_size": vocab,
            "hidden_size": self._arch_field("embedding_length"),
            "intermediate_size": self._arch_field("feed_forward_length"),
            "num_hidden_layers": self._arch_field("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": self._arch_field("attention.key_length"),
            "max_position_embeddings": self._arch_field("context_length"),
            "rms_norm_eps": self._arch_field("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._arch_field("rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "torch_dtype": self._default_dtype(),
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.eos_token_ids or None,
        }
        config = ModelConfig.from_dict(raw, source=f"{self.path} (GGUF metadata)")
        return replace(config, rope_scaling=self._rope_scaling(config))

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation, as llama.cpp counts them: eos, end-of-turn and end-of-message."""
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        ids = [self.field(key) for key in keys]
        return list(dict.fromkeys(i for i in ids if isinstance(i, int)))

    def _default_dtype(self) -> str:
        """float16/bfloat16 when every matrix is stored so, float32 for F32 files, bfloat16 for quantized."""
        kinds = {_type_name(t.ggml_type) for t in self._tensors.values() if len(t.shape) > 1}
        if kinds == {"F32"}:
            return "float32"
        if kinds == {"F16"}:
            return "float16"
        return "bfloat16"

    def _rope_scaling(self, config: ModelConfig) -> RopeScaling:
        """Linear scaling from `{arch}.rope.scaling.*`, or the per-frequency divisors of a `rope_freqs`
        tensor (how llama.cpp's converter stores Llama 3.1 scaling)."""
        freqs = self._tensors.get(ROPE_FREQS_TENSOR)
        if freqs is not None:
            if _type_name(freqs.ggml_type) != "F32":
                raise ModelLoadError(f"{self.path}: tensor '{ROPE_FREQS_TENSOR}' is stored as "
                                     f"{_type_name(freqs.ggml_type)}, expected F32")
            count = int(np.prod(freqs.shape))
            divisors = torch.from_numpy(np.fromfile(self.path, dtype="<f4", count=count, offset=freqs.offset))
            if divisors.numel() != config.head_dim // 2:
                raise ModelLoadError(f"{self.path}: tensor '{ROPE_FREQS_TENSOR}' has {divisors.numel()} values, "
                                     f"expected head_dim/2 = {config.head_dim // 2}")
            return RopeScaling(rope_type="frequency_divisors", divisors=tuple(divisors.tolist()))
        kind = self._arch_field("rope.scaling.type", "none")
        if kind in ("none", None):
            return RopeScaling()
        if kind == "linear":
            return RopeScaling(rope_type="linear", factor=float(self._arch_field("rope.scaling.factor", 1.0)))
        raise ModelLoadError(f"{self.path}: {self.architecture}.rope.scaling.type={kind!r} is not supported "
                             "(none, linear, or a rope_freqs tensor)")

    def quantization_summary(self) -> dict[str, int]:
        """How many tensors the file stores in each ggml type, e.g. {"Q4_K": 96, "F32": 65}."""
        return dict(Counter(_type_name(t.ggml_type) for t in self._tensors.values()))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (Hugging Face name, float32 tensor) for every weight, in file order.

        q_proj/k_proj rows are put back in the Hugging Face order for Llama files. Raises ModelLoadError
        naming the tensor for an unknown tensor name or an unsupported ggml type.
        """
        config = self.model_config
        file_bytes = np.memmap(self.path, dtype=np.uint8, mode="r")
        for tensor in self._tensors.values():
            if tensor.name == ROPE_FREQS_TENSOR:
                continue
            name = hf_tensor_name(tensor.name)
            if name is None:
                raise ModelLoadError(f"{self.path}: tensor '{tensor.name}' is not part of a "
                                     f"{GGUF_ARCHITECTURES[self.architecture]} model")
            weight = self._dequantized(tensor, file_bytes)
            if self.architecture == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                weight = unpermute_rotary_rows(weight, config.num_heads)
            elif self.architecture == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                weight = unpermute_rotary_rows(weight, config.num_kv_heads)
            yield name, weight

    def _dequantized(self, tensor: TensorInfo, file_bytes: np.ndarray) -> torch.Tensor:
        """The tensor's values as float32 [shape], decoded by the gguf package from its rows of ggml blocks."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

        kind = _type_name(tensor.ggml_type)
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(f"{self.path}: tensor '{tensor.name}' is stored as {kind}, which pdserve does not "
                                 f"load (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
        qtype = GGMLQuantizationType(tensor.ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        row = tensor.shape[-1]
        rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
        if row % block:
            raise ModelLoadError(f"{self.path}: tensor '{tensor.name}' rows of {row} values do not fill whole "
                                 f"{kind} blocks of {block}")
        row_bytes = row // block * block_bytes
        raw = file_bytes[tensor.offset:tensor.offset + rows * row_bytes].reshape(rows, row_bytes)
        values = np.array(dequantize(raw, qtype), dtype=np.float32)  # a copy: never a view of the read-only map
        return torch.from_numpy(values.reshape(tensor.shape))


def _type_name(ggml_type: int) -> str:
    """The ggml type's name ("Q4_K"), or "type N" for an id the gguf package does not know."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a ggml tensor name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_MODULES:
        return None
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_MODULES[module]}.{kind}"


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (0, 2, 4, ..., 1, 3, 5, ...) of ggml's interleaved
    rotary pairs go back to Hugging Face's halves. weight: [num_heads * head_dim, ...] (or a bias)."""
    rows = weight.shape[0]
    rest = tuple(weight.shape[1:])
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


