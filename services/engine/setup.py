"""Build an engine from a checkpoint (directory, GGUF file or Hub id) and EngineArgs: shared by `pdserve generate`, the
workers and the benchmarks, so every role sizes its KV cache the same way."""

from __future__ import annotations

import logging

import torch

from pdserve.engine.config import EngineArgs, EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from pdserve.kernels.kv_quant import kv_cache_torch_dtype
from pdserve.models.loader import load_model
from pdserve.models.source import resolve_model
from pdserve.models.tokenizer import Tokenizer

__all__ = ["EngineArgs", "build_engine", "default_device"]

logger = logging.getLogger(__name__)


def default_device() -> str:
    """cuda when a GPU is present, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine(args: EngineArgs) -> tuple[LLMEngine, Tokenizer]:
    """Load the checkpoint and tokenizer and size the KV cache from kv_cache_mb."""
    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = source.tokenizer()
    if args.tensor_parallel_size > 1:
        runner = _tensor_parallel_runner(args, source)
        model_config = source.model_config()
    else:
        model, model_config = load_model(source, dtype=args.dtype, device=args.device)
        kv_dtype = kv_cache_torch_dtype(args.kv_cache_dtype, model.embed_tokens.weight.dtype)
        per_block = kv_cache_bytes_per_block(model_config, args.block_size, kv_dtype)
        num_blocks = max(1, args.kv_cache_mb * 2**20 // per_block)
        runner = ModelRunner(model, model_config, num_blocks, args.block_size, kv_dtype,
                             single_thread_step_tokens=args.single_thread_step_tokens, cpu_linear=args.cpu_linear)
    max_model_len = min(args.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    speculative = args.speculative_config()
    config = EngineConfig(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=args.enable_prefix_caching, max_model_len=max_model_len,
                          speculative=speculative)
    draft_runner = _draft_runner(args, tokenizer, runner.num_blocks) if args.draft_model else None
    return LLMEngine(runner, tokenizer, config, draft_runner), tokenizer


def _draft_runner(args: EngineArgs, tokenizer: Tokenizer, num_blocks: int) -> ModelRunner:
    """The draft model's runner for --speculative draft: its own KV cache of num_blocks blocks (the target's
    count, addressed by the target's block tables; memory on top of --kv-cache-mb, all heads, unquantized), in
    --dtype (or the draft's own), on rank 0's device."""
    source = resolve_model(args.draft_model)
    if source.tokenizer().backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise ValueError(f"--draft-model {args.draft_model}: its tokenizer differs from --model's (a draft must "
                         "propose in the model's token ids)")
    model, model_config = load_model(source, dtype=args.dtype, device=args.device)
    runner = ModelRunner(model, model_config, num_blocks, args.block_size,
                         single_thread_step_tokens=args.single_thread_step_tokens, cpu_linear=args.cpu_linear)
    logger.info("draft model %s: KV cache of %d blocks, %.1f MiB on top of --kv-cache-mb", args.draft_model,
                num_blocks, runner.kv_cache_bytes() / 2**20)
    return runner


def _tensor_parallel_runner(args: EngineArgs, source):
    """Rank 0's runner over args.tensor_parallel_size ranks; each rank's KV cache gets kv_cache_mb for
    its own heads (so the server holds tensor_parallel_size times as many tokens' KV per MiB and rank)."""
    from pdserve.engine.tensor_parallel import TensorParallelSettings, check_devices, tensor_parallel_runner
    from pdserve.models.config import DTYPES
    from pdserve.models.tensor_parallel import local_config

    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--tensor-parallel-size > 1 runs on CPUs (gloo) or CUDA GPUs (nccl), not {args.device!r}")
    settings = TensorParallelSettings(size=args.tensor_parallel_size, backend="nccl" if args.device == "cuda" else "gloo")
    check_devices(settings)  # before loading anything: one GPU per rank
    config = source.model_config()
    local = local_config(config, settings.size)  # a ValueError naming what does not divide
    dtype = DTYPES[args.dtype] if args.dtype else config.dtype
    kv_dtype = kv_cache_torch_dtype(args.kv_cache_dtype, dtype)
    num_blocks = max(1, args.kv_cache_mb * 2**20 // kv_cache_bytes_per_block(local, args.block_size, kv_dtype))
    return tensor_parallel_runner(str(source.path), settings, num_blocks, args.block_size, dtype,
                                  threads=args.threads or 1, kv_cache_dtype=args.kv_cache_dtype,
                                  cpu_linear=args.cpu_linear, single_thread_step_tokens=args.single_thread_step_tokens)
