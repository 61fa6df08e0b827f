"""Tensor parallelism on GPUs (nccl, one GPU per rank): a split engine gives the tokens of one process, and
a split that needs more GPUs than the machine has is refused before anything starts, on any machine."""

from __future__ import annotations

import random

import pytest
import torch

from helpers.engine_testing import greedy, random_prompt
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.setup import EngineArgs, build_engine
from pdserve.engine.tensor_parallel import RankProcesses, TensorParallelSettings, tensor_parallel_runner
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import make_tiny_model

BLOCK_SIZE = 16


def test_more_ranks_than_gpus_is_refused_before_any_rank_starts(tmp_path):
    gpus = torch.cuda.device_count()
    size = max(2, gpus + 1)
    ranks = RankProcesses(TensorParallelSettings(size=size, backend="nccl"))
    with pytest.raises(ValueError, match=f"needs {size} GPUs .* has {gpus}"):
        ranks.start(str(tmp_path), torch.float32, 8, BLOCK_SIZE)
    assert ranks.processes == []
    with pytest.raises(ValueError, match="one per rank"):
        build_engine(EngineArgs(model=str(make_tiny_model(tmp_path / "m", size="tiny")), device="cuda",
                                tensor_parallel_size=size))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism on GPUs needs 2 GPUs")
def test_two_gpus_give_the_tokens_of_one(tmp_path):
    model_dir = make_tiny_model(tmp_path / "trained", size="tiny", train_steps=600)
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.randint(4, 90)) for _ in range(12)]
    config = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=128)
    model, model_config = load_model(model_dir, dtype=torch.float32, device="cuda")
    whole = LLMEngine(ModelRunner(model, model_config, 256, BLOCK_SIZE), None, config).generate(prompts, greedy(64))
    runner = tensor_parallel_runner(str(model_dir), TensorParallelSettings(size=2, backend="nccl"), 256, BLOCK_SIZE)
    try:
        split = LLMEngine(runner, None, config).generate(prompts, greedy(64))
        print(f"control overhead: {runner.control_seconds / runner.step_seconds:.2%} of the step time")
    finally:
        runner.close()
    assert [r.samples[0].token_ids for r in split] == [r.samples[0].token_ids for r in whole]
