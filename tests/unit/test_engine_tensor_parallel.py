"""The engine on a tensor-parallel runner (rank 0 here, rank 1 a spawned process, gloo, float32): the
same tokens as on one process, through continuous batching, chunked prefill, prefix caching and
copy-on-write; a rank that dies fails the step instead of hanging it, and no rank process is left."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from helpers.engine_testing import greedy, random_prompt, run_with_arrivals
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.tensor_parallel import TensorParallelSettings, tensor_parallel_runner
from pdserve.models.loader import load_model
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer

BLOCK_SIZE, NUM_BLOCKS = 16, 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained_tp"), size="tiny", train_steps=600)


def _engine(runner, model_dir) -> LLMEngine:
    return LLMEngine(runner, Tokenizer.from_dir(model_dir), EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=8,
                                                                         max_num_batched_tokens=64))


def _workload():
    rng = random.Random(3)
    shared = random_prompt(rng, 40)
    work = [(rng.randrange(20), random_prompt(rng, rng.randint(1, 90)), greedy(rng.randint(8, 64)))
            for _ in range(12)]
    work += [(5, shared + random_prompt(rng, 10), greedy(24)), (9, shared + random_prompt(rng, 12), greedy(24)),
             (2, random_prompt(rng, 23), SamplingParams(max_tokens=16, n=2, temperature=0.0, ignore_eos=True))]
    return work


def test_two_ranks_give_the_tokens_of_one(trained):
    model, config = load_model(trained, dtype=torch.float32)
    reference = run_with_arrivals(_engine(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE), trained), _workload())
    runner = tensor_parallel_runner(str(trained), TensorParallelSettings(size=2, timeout_s=30), NUM_BLOCKS, BLOCK_SIZE)
    try:
        assert runner.kv_caches[0][0].shape[2] == config.num_kv_heads // 2  # this rank's KV heads only
        engine = _engine(runner, trained)
        results = run_with_arrivals(engine, _workload())
        assert engine.stats().counters.num_cache_hit_tokens > 0  # the shared prefix was served from the cache
        assert 0 < runner.control_seconds < runner.step_seconds
        print(f"control overhead: {runner.control_seconds / runner.step_seconds:.2%} of the step time")
    finally:
        runner.close()
    for request_id, result in reference.items():
        assert [s.token_ids for s in results[request_id].samples] == [s.token_ids for s in result.samples], request_id
    assert not any(p.is_alive() for p in runner.ranks.processes)


def test_a_rank_killed_mid_generation_fails_the_step_and_leaves_no_process(trained):
    runner = tensor_parallel_runner(str(trained), TensorParallelSettings(size=2, timeout_s=10), NUM_BLOCKS, BLOCK_SIZE)
    process = runner.ranks.processes[0]
    try:
        engine = _engine(runner, trained)
        engine.add_request("r", random_prompt(random.Random(4), 40), greedy(64))
        engine.step()
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        with pytest.raises((RuntimeError, BrokenPipeError, OSError)):
            for _ in range(64):
                engine.step()
    finally:
        runner.close()
    assert not process.is_alive() and runner.ranks.processes == []


def test_speculation_on_two_ranks_gives_the_tokens_of_one(trained):
    """n-gram and draft-model speculation on a tensor-parallel runner: verification chunks of 1 + K rows per
    sample through the ranks' row mapping, the draft (one process, rank 0's) over the same block tables."""
    from pdserve.engine.speculation import SpeculativeConfig

    model, config = load_model(trained, dtype=torch.float32)
    rng = random.Random(4)
    work = []
    for i in range(10):
        phrase = random_prompt(rng, rng.randint(6, 14))
        work.append((rng.randrange(8), random_prompt(rng, 5) + phrase + random_prompt(rng, 3) + phrase + phrase[:2],
                     greedy(rng.randint(16, 40))))
    reference = run_with_arrivals(_engine(ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE), trained), work)
    runner = tensor_parallel_runner(str(trained), TensorParallelSettings(size=2, timeout_s=30), NUM_BLOCKS, BLOCK_SIZE)
    try:
        for speculative, draft in ((SpeculativeConfig(max_batch_seqs=8), None),
                                   (SpeculativeConfig("draft", max_batch_seqs=8, draft_model=str(trained)),
                                    ModelRunner(model, config, NUM_BLOCKS, BLOCK_SIZE))):
            engine = LLMEngine(runner, Tokenizer.from_dir(trained),
                               EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=64,
                                            speculative=speculative), draft)
            results = run_with_arrivals(engine, work)
            for request_id, result in reference.items():
                assert [s.token_ids for s in results[request_id].samples] == [s.token_ids for s in result.samples], \
                    (speculative.method, request_id)
            assert engine.stats().counters.num_speculative_accepted_tokens > 0, speculative.method
    finally:
        runner.close()
