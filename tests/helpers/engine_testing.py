"""Test helpers for engine tests: the real tiny checkpoint, runner and tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.outputs import GenerationResult, SampleOutput
from pdserve.models.loader import load_model
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.models.torch_threads import one_torch_thread  # noqa: F401 (tests import it from here)

BLOCK_SIZE = 16


@dataclass
class TinyModel:
    """A loaded tiny Llama checkpoint (the weights are shared by every engine built from it)."""

    model: torch.nn.Module
    config: object
    tokenizer: Tokenizer

    def engine(self, num_blocks: int = 512, **config) -> LLMEngine:
        """A fresh engine with its own KV cache of num_blocks blocks."""
        runner = ModelRunner(self.model, self.config, num_blocks, BLOCK_SIZE)
        return LLMEngine(runner, self.tokenizer, EngineConfig(block_size=BLOCK_SIZE, **config))


def load_tiny(directory) -> TinyModel:
    """Write the tiny Llama checkpoint (seed 0) into directory and load it in float32."""
    path = make_tiny_model(directory, arch="llama", seed=0, size="tiny")
    model, config = load_model(path, dtype=torch.float32)
    return TinyModel(model, config, Tokenizer.from_dir(path))


def random_prompt(rng: random.Random, length: int, vocab: int = 512) -> list[int]:
    """length random token ids, avoiding the low special ids."""
    return [rng.randrange(3, vocab) for _ in range(length)]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    """Greedy params that ignore EOS unless told otherwise (so lengths are predictable)."""
    kwargs.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def run_alone(tiny: TinyModel, prompt: list[int], params: SamplingParams, **config) -> GenerationResult:
    """The request alone in a fresh engine."""
    return tiny.engine(**config).generate([prompt], params)[0]


def run_with_arrivals(engine: LLMEngine, requests: list[tuple[int, list[int], SamplingParams]]
                      ) -> dict[str, GenerationResult]:
    """Add request i at step arrivals[i] (requests: (arrival step, prompt, params)) and step
    until all finish; results keyed by request id "r{i}"."""
    results: dict[str, GenerationResult] = {}
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]][0] <= step:
            i = pending.pop(0)
            _, prompt, params = requests[i]
            engine.add_request(f"r{i}", prompt, params)
            samples = [SampleOutput(k) for k in range(params.n)]
            results[f"r{i}"] = GenerationResult(f"r{i}", prompt, samples)
        for out in engine.step():
            results[out.request_id].add(out)
        step += 1
    return results


def assert_no_leaks(engine: LLMEngine) -> None:
    """Every block is free again and the pool's bookkeeping agrees with itself."""
    pool = engine.pool
    assert not engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks == engine.stats().num_blocks_free
    assert all(block.ref_count == 0 for block in pool.blocks)
    assert len(list(pool.free_queue)) == pool.num_blocks
