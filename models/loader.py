"""Load a Llama-family checkpoint: a Hugging Face directory (one safetensors file or sharded), a GGUF file, or a
Hub id (see pdserve.models.source)."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.models.config import DTYPES, ModelConfig, ModelLoadError
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.rope import rope_cos_sin_cache
from pdserve.models.source import ModelSource, resolve_model

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF names -> (our fused parameter, which slice). Slices are filled in order of `parts`.
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(checkpoint: str | Path | ModelSource, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the network for `checkpoint` (a directory, a .gguf file, a Hub id or a ModelSource) and fill it
    with the checkpoint's weights.

    dtype: float32 / bfloat16 / float16 (None keeps the checkpoint's; bfloat16 for quantized GGUF files).
    Every expected tensor must be present with its exact shape; errors name the file and the key.
    """
    source = resolve_model(checkpoint)
    config = source.model_config()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or config.dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    model.tie_weights()
    expected = _expected_tensors(model, config)
    seen: set[str] = set()
    params = dict(model.named_parameters())
    for name, tensor, origin in _iter_tensors(source):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in expected:
            continue  # extra tensors (e.g. an untied lm_head copy in a tied checkpoint) are harmless
        target, row_slice, shape = expected[name]
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{origin}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape} "
                f"for this checkpoint's configuration"
            )
        with torch.no_grad():
            params[target][row_slice].copy_(tensor)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelLoadError(
            f"{source.path}: checkpoint is missing tensor '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model = model.to(dtype)
    model.tie_weights()
    model.cos_sin_cache = _rope_buffer(config, device)
    if source.format == "gguf":
        size_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        logger.info("%s: GGUF tensors %s dequantized to %s (%.0f MiB of weights; nothing stays quantized)",
                    source.path, source.gguf.quantization_summary(), str(dtype).removeprefix("torch."), size_mib)
    return model.eval().requires_grad_(False), config


def _iter_tensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(Hugging Face name, tensor, file) for every tensor of the checkpoint."""
    if source.format == "gguf":
        for name, tensor in source.gguf.tensors():
            yield name, tensor, source.path
    else:
        yield from _iter_checkpoint(source.path)


def _rope_buffer(config: ModelConfig, device) -> torch.Tensor:
    return rope_cos_sin_cache(config.head_dim, config.rope_theta, config.rope_scaling,
                              config.max_position_embeddings).to(device)


def _expected_tensors(model: LlamaForCausalLM, config: ModelConfig):
    """Map each HF tensor name to (our parameter, row slice into it, expected shape)."""
    expected: dict[str, tuple[str, slice, tuple[int, ...]]] = {}
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    split_sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [config.intermediate_size] * 2}
    for ours, param in model.named_parameters():
        hf = "model." + ours if not ours.startswith("lm_head") else ours
        module, _, kind = hf.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in split_sizes:
            sizes = split_sizes[leaf]
            for hf_leaf, (fused, index) in _FUSED.items():
                if fused != leaf:
                    continue
                start = sum(sizes[:index])
                rows = slice(start, start + sizes[index])
                shape = (sizes[index],) + tuple(param.shape[1:])
                expected[f"{parent}.{hf_leaf}.{kind}"] = (ours, rows, shape)
        else:
            expected[hf] = (ours, slice(None), tuple(param.shape))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise ModelLoadError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} in the model directory")
    for path in files:
        if not path.is_file():
            raise ModelLoadError(f"{path}: shard named in {INDEX_FILE} does not exist")
    return files


def _iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor of every shard, checking each file's size."""
    for path in _checkpoint_files(model_dir):
        _check_not_truncated(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), path
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from exc


def _check_not_truncated(path: Path) -> None:
    """Compare the header's declared data size with the file's, so a cut-off download is named."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ModelLoadError(f"{path}: truncated safetensors file (header of {header_len} bytes "
                                 f"but the file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, header declares {need})")
