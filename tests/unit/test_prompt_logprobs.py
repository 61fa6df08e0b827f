"""Prompt logprobs and logit_bias in the engine, against transformers' logits on the same weights."""

from __future__ import annotations

import random

import pytest
import torch

from helpers.engine_testing import assert_no_leaks, greedy, one_torch_thread, random_prompt, run_with_arrivals
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.prompt_logprobs import MAX_SCORED_TOKENS_PER_STEP
from pdserve.models.loader import load_model
from pdserve.models.sampling_params import SamplingParams, SamplingParamsError
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer

BLOCK_SIZE = 16


class Tiny:
    """The tiny checkpoint loaded twice: by pdserve (engines) and by transformers (the reference)."""

    def __init__(self, path) -> None:
        import transformers

        self.model, self.config = load_model(path, dtype=torch.float32)
        self.tokenizer = Tokenizer.from_dir(path)
        self.reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def engine(self, num_blocks: int = 512, **config) -> LLMEngine:
        runner = ModelRunner(self.model, self.config, num_blocks, BLOCK_SIZE)
        return LLMEngine(runner, self.tokenizer, EngineConfig(block_size=BLOCK_SIZE, **config))

    def reference_logprobs(self, prompt: list[int]) -> torch.Tensor:
        """[P, V] log_softmax of transformers' logits at every prompt position."""
        with torch.no_grad():
            logits = self.reference(torch.tensor([prompt])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        path = make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0, size="tiny")
        yield Tiny(path)


def _check_scores(tiny: Tiny, prompt: list[int], scores, top_n: int) -> None:
    reference = tiny.reference_logprobs(prompt)
    assert scores.token_ids == prompt
    expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:], dtype=torch.int64)]
    assert torch.allclose(torch.tensor(scores.logprobs), expected, atol=1e-4), "prompt token logprobs"
    assert len(scores.top_logprobs) == len(prompt) - 1
    if top_n:
        values, _ = reference[:-1].topk(top_n, dim=-1)
        got = torch.tensor([[lp for _, lp in row] for row in scores.top_logprobs])
        assert torch.allclose(got, values, atol=1e-4), "top alternatives"
        for row, position in zip(scores.top_logprobs, range(len(prompt) - 1)):
            assert all(abs(reference[position, token].item() - lp) < 1e-4 for token, lp in row)
    else:
        assert all(row == [] for row in scores.top_logprobs)


def test_prompt_logprobs_match_transformers_through_chunks_arrivals_and_the_prefix_cache(tiny):
    rng = random.Random(7)
    shared = random_prompt(rng, 48)
    prompts = [shared + random_prompt(rng, rng.randint(1, 40)) for _ in range(6)]
    prompts += [random_prompt(rng, rng.randint(1, 70)) for _ in range(6)] + [random_prompt(rng, 1)]
    engine = tiny.engine(max_num_seqs=8, max_num_batched_tokens=32, enable_prefix_caching=True)
    # The shared prefix is in the prefix cache before any scoring request arrives: a hit would
    # leave its positions unscored.
    warm = [(0, shared + random_prompt(rng, 5), greedy(2))]
    run_with_arrivals(engine, warm)
    workload = [(rng.randrange(6), p, greedy(3, prompt_logprobs=i % 3, n=1 + i % 2, seed=i))
                for i, p in enumerate(prompts)]
    results = run_with_arrivals(engine, workload)
    for i, (_, prompt, params) in enumerate(workload):
        scores = results[f"r{i}"].prompt_logprobs
        assert scores is not None, f"request {i}"
        _check_scores(tiny, prompt, scores, params.prompt_logprobs)
    # The first token still follows the prompt exactly (the sampling row is the chunk's last).
    plain = run_with_arrivals(tiny.engine(), [(0, p, greedy(3)) for p in prompts])
    for i in range(len(prompts)):
        assert results[f"r{i}"].samples[0].token_ids == plain[f"r{i}"].samples[0].token_ids
    assert_no_leaks(engine)


def test_prompt_logprobs_are_scored_once_through_preemption(tiny):
    rng = random.Random(8)
    workload = [(rng.randrange(4), random_prompt(rng, rng.randint(20, 60)), greedy(40, prompt_logprobs=2))
                for _ in range(10)]
    engine = tiny.engine(num_blocks=12, max_num_batched_tokens=64, enable_prefix_caching=False)
    results = run_with_arrivals(engine, workload)
    assert engine.stats().num_preemptions >= 2
    for i, (_, prompt, _) in enumerate(workload):
        _check_scores(tiny, prompt, results[f"r{i}"].prompt_logprobs, 2)
    assert_no_leaks(engine)


def test_a_step_scores_a_bounded_number_of_prompt_tokens(tiny):
    rng = random.Random(9)
    prompts = [random_prompt(rng, 700), random_prompt(rng, 300)]
    engine = tiny.engine(max_num_batched_tokens=2048, enable_prefix_caching=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(2, prompt_logprobs=0))
    engine.add_request("plain", random_prompt(rng, 400), greedy(2))
    engine.step()
    counters = engine.stats().counters
    # 512 scored tokens of the first prompt; the second scoring prompt waits for the next step's budget, and the
    # plain one behind it does not wait for it.
    assert counters.num_prefill_tokens_computed == MAX_SCORED_TOKENS_PER_STEP + 400
    assert engine.requests["r1"].status.value == "waiting" and engine.requests["plain"].status.value == "running"
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                results[out.request_id] = out.prompt_logprobs
    for i, prompt in enumerate(prompts):
        _check_scores(tiny, prompt, results[f"r{i}"], 0)
    assert_no_leaks(engine)


def test_no_prompt_logprobs_unless_asked(tiny):
    result = tiny.engine().generate([[5, 6, 7, 8]], greedy(2))[0]
    assert result.prompt_logprobs is None


def test_logit_bias_steers_the_draw_and_leaves_logprobs_raw(tiny):
    prompt = [5, 9, 30, 41, 77]
    engine = tiny.engine()
    plain = engine.generate([prompt], greedy(4, logprobs=0))[0].samples[0]
    favoured = 400
    pushed = engine.generate([prompt], greedy(4, logprobs=0, logit_bias={favoured: 100.0}))[0].samples[0]
    assert pushed.token_ids == [favoured] * 4
    # The logprob returned is the model's own (before the bias), as OpenAI and vLLM return it.
    reference = tiny.reference_logprobs(prompt)[-1]
    assert abs(pushed.logprobs[0] - reference[favoured].item()) < 1e-4
    banned = engine.generate([prompt], greedy(4, logit_bias={plain.token_ids[0]: -100.0}))[0].samples[0]
    assert banned.token_ids[0] != plain.token_ids[0]
    # Sampled rows take the bias too.
    sampled = engine.generate([prompt], SamplingParams(max_tokens=4, seed=3, logit_bias={favoured: 100.0},
                                                       ignore_eos=True))[0].samples[0]
    assert sampled.token_ids == [favoured] * 4


@pytest.mark.parametrize("bias, message", [
    ({1: 100.5}, "logit_bias values"), ({-1: 1.0}, "logit_bias token ids"),
    ({1: float("nan")}, "logit_bias values"), ({i: 1.0 for i in range(1025)}, "logit_bias has 1025"),
])
def test_bad_logit_bias_is_refused_naming_the_field(bias, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(logit_bias=bias)


def test_logit_bias_outside_the_vocabulary_is_refused(tiny):
    engine = tiny.engine()
    with pytest.raises(ValueError, match="logit_bias token id"):
        engine.add_request("r", [1, 2, 3], SamplingParams(logit_bias={tiny.config.vocab_size: 1.0}))
