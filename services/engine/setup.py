"""Build an engine from a checkpoint directory and flags: shared by `pdserve generate`, the
workers and the benchmarks, so every role sizes its KV cache the same way."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.cli.env import add_flag
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from pdserve.kernels.kv_quant import KV_CACHE_DTYPES, kv_cache_torch_dtype
from pdserve.models.loader import load_model
from pdserve.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineArgs:
    """What a process needs to build its engine (the `engine` section of the config)."""

    model: str
    dtype: str | None = None
    device: str = "cpu"
    block_size: int = 16
    kv_cache_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    threads: int | None = None
    kv_cache_dtype: str = "auto"


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Flags (and PDSERVE_* variables) for EngineArgs."""
    add_flag(parser, "--model", None, str, "Hugging Face checkpoint directory", required=False)
    add_flag(parser, "--dtype", None, str, "float32 | bfloat16 | float16 (default: the checkpoint's)")
    add_flag(parser, "--device", "cuda" if torch.cuda.is_available() else "cpu", str, "cpu or cuda")
    add_flag(parser, "--block-size", 16, int, "tokens per KV block")
    add_flag(parser, "--kv-cache-mb", 512, int, "memory for the KV cache, MiB")
    add_flag(parser, "--max-num-seqs", 64, int, "running sequences at once")
    add_flag(parser, "--max-num-batched-tokens", 2048, int, "tokens computed per step")
    add_flag(parser, "--max-model-len", None, int, "prompt + output limit (default: the model's)")
    add_flag(parser, "--no-prefix-caching", False, bool, "turn the prefix cache off")
    add_flag(parser, "--threads", None, int, "torch CPU threads (default: torch's choice)")
    add_flag(parser, "--kv-cache-dtype", "auto", str,
             "KV cache dtype: auto (the model's) | int8 | fp8 (e4m3), with per-block scales",
             choices=KV_CACHE_DTYPES)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed flags; a clear error when the model is missing."""
    if not ns.model:
        raise ValueError("--model DIR (or PDSERVE_MODEL) is required")
    if not Path(ns.model).is_dir():
        raise FileNotFoundError(f"--model {ns.model}: no such directory")
    if ns.kv_cache_dtype not in KV_CACHE_DTYPES:  # an invalid PDSERVE_KV_CACHE_DTYPE skips argparse
        raise ValueError(f"--kv-cache-dtype {ns.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    return EngineArgs(model=ns.model, dtype=ns.dtype, device=ns.device, block_size=ns.block_size,
                      kv_cache_mb=ns.kv_cache_mb, max_num_seqs=ns.max_num_seqs,
                      max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len,
                      enable_prefix_caching=not ns.no_prefix_caching, threads=ns.threads,
                      kv_cache_dtype=ns.kv_cache_dtype)


def build_engine(args: EngineArgs) -> tuple[LLMEngine, Tokenizer]:
    """Load the checkpoint and tokenizer and size the KV cache from kv_cache_mb."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_dir(args.model)
    model, model_config = load_model(args.model, dtype=args.dtype, device=args.device)
    kv_dtype = kv_cache_torch_dtype(args.kv_cache_dtype, model.embed_tokens.weight.dtype)
    per_block = kv_cache_bytes_per_block(model_config, args.block_size, kv_dtype)
    num_blocks = max(1, args.kv_cache_mb * 2**20 // per_block)
    runner = ModelRunner(model, model_config, num_blocks, args.block_size, kv_dtype)
    max_model_len = min(args.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    config = EngineConfig(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=args.enable_prefix_caching, max_model_len=max_model_len)
    return LLMEngine(runner, tokenizer, config), tokenizer
