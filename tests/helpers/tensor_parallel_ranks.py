"""Rank processes for the tensor-parallel tests: each joins a gloo group, loads the checkpoint, keeps
its shard, and runs the same greedy generation as a whole model would (tests/helpers/paged_generation)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from helpers.paged_generation import allocate_tables, greedy_paged
from pdserve.engine.model_runner import ModelRunner
from pdserve.models.loader import load_model
from pdserve.models.tensor_parallel import TensorParallelGroup, shard_model
from pdserve.state.embedded_redis import free_port

BLOCK_SIZE = 16


def whole_model_greedy(model_dir, prompts: list[list[int]], max_new: int):
    """(prompt logits, generated tokens) of the unsharded model, in this process."""
    model, config = load_model(model_dir, dtype=torch.float32)
    tables, num_blocks = allocate_tables([len(p) for p in prompts], max_new, BLOCK_SIZE)
    return greedy_paged(ModelRunner(model, config, num_blocks, BLOCK_SIZE), prompts, max_new, tables)


def _rank(rank: int, size: int, port: int, model_dir: str, prompts, max_new: int, out_path: str) -> None:
    torch.set_num_threads(1)
    tp = TensorParallelGroup.join(rank, size, f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        model, _ = load_model(model_dir, dtype=torch.float32)
        local = shard_model(model, tp)
        tables, num_blocks = allocate_tables([len(p) for p in prompts], max_new, BLOCK_SIZE)
        runner = ModelRunner(model, local, num_blocks, BLOCK_SIZE)
        logits, tokens = greedy_paged(runner, prompts, max_new, tables)
        kv_heads = runner.kv_caches[0][0].shape[2]
        torch.save({"logits": logits, "tokens": tokens, "kv_heads": kv_heads}, f"{out_path}.{rank}")
    finally:
        tp.leave()


def sharded_greedy(model_dir, prompts: list[list[int]], max_new: int, size: int, out_path) -> list[dict]:
    """Run the generation on `size` rank processes; every rank's (logits, tokens, KV heads it holds)."""
    mp.start_processes(_rank, args=(size, free_port(), str(model_dir), prompts, max_new, str(out_path)),
                       nprocs=size, start_method="spawn", join=True)
    return [torch.load(f"{out_path}.{rank}") for rank in range(size)]
