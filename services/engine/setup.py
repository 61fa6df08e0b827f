"""Build an engine from a checkpoint (directory, GGUF file or Hub id) and EngineArgs: shared by `pdserve generate`, the
workers and the benchmarks, so every role sizes its KV cache the same way."""

from __future__ import annotations

import torch

from pdserve.engine.config import EngineArgs, EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from pdserve.kernels.kv_quant import kv_cache_torch_dtype
from pdserve.models.loader import load_model
from pdserve.models.source import resolve_model
from pdserve.models.tokenizer import Tokenizer

__all__ = ["EngineArgs", "build_engine", "default_device"]


def default_device() -> str:
    """cuda when a GPU is present, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine(args: EngineArgs) -> tuple[LLMEngine, Tokenizer]:
    """Load the checkpoint and tokenizer and size the KV cache from kv_cache_mb."""
    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = source.tokenizer()
    model, model_config = load_model(source, dtype=args.dtype, device=args.device)
    kv_dtype = kv_cache_torch_dtype(args.kv_cache_dtype, model.embed_tokens.weight.dtype)
    per_block = kv_cache_bytes_per_block(model_config, args.block_size, kv_dtype)
    num_blocks = max(1, args.kv_cache_mb * 2**20 // per_block)
    runner = ModelRunner(model, model_config, num_blocks, args.block_size, kv_dtype,
                         single_thread_step_tokens=args.single_thread_step_tokens, cpu_linear=args.cpu_linear)
    max_model_len = min(args.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    config = EngineConfig(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=args.enable_prefix_caching, max_model_len=max_model_len)
    return LLMEngine(runner, tokenizer, config), tokenizer
