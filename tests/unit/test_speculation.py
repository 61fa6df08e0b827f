"""Speculative decoding (n-gram prompt lookup and a draft model) in the engine: the same tokens as without it,
greedy and sampled, through random arrivals, chunked prefill, prefix caching, preemption and n > 1; rejected
proposals leave no block behind; a draft identical to the model has every proposal accepted (its own KV cache
is kept right); and the distribution test that shows it would catch a broken verification step."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from helpers.engine_testing import BLOCK_SIZE, assert_no_leaks, greedy, random_prompt, run_with_arrivals
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sample_processor import SampleProcessor
from pdserve.engine.speculation import MAX_BACKOFF_STEPS, NgramProposer, Proposer, SpeculationPace, SpeculativeConfig
from pdserve.models.loader import load_model
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tiny_model_train import training_tokens
from pdserve.models.tokenizer import Tokenizer

NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("trained_spec"), size="tiny", train_steps=600)
    model, config = load_model(path, dtype=torch.float32)
    return model, config, Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, trained):
    """Draft models with the trained model's tokenizer: "self" (the model itself, every greedy proposal right)
    and "other" (another seed, trained less: some proposals right)."""
    path = make_tiny_model(tmp_path_factory.mktemp("draft_spec"), size="tiny", seed=1, train_steps=150)
    other, other_config = load_model(path, dtype=torch.float32)
    return {"self": trained[:2], "other": (other, other_config)}


def _engine(trained, speculative: SpeculativeConfig | None, draft=None, **config) -> LLMEngine:
    model, model_config, tokenizer = trained
    config.setdefault("max_num_batched_tokens", 96)
    draft_runner = ModelRunner(draft[0], draft[1], NUM_BLOCKS, BLOCK_SIZE) if draft is not None else None
    return LLMEngine(ModelRunner(model, model_config, NUM_BLOCKS, BLOCK_SIZE), tokenizer,
                     EngineConfig(block_size=BLOCK_SIZE, speculative=speculative, **config), draft_runner)


def _draft_config(**kwargs) -> SpeculativeConfig:
    return SpeculativeConfig(method="draft", draft_model="(in memory)", **kwargs)


def _repetitive_prompt(rng: random.Random) -> list[int]:
    """A random phrase said three times around random filler: what prompt lookup is for (code edits,
    summaries quoting their source)."""
    phrase = random_prompt(rng, rng.randint(6, 16))
    return random_prompt(rng, rng.randint(1, 20)) + phrase + random_prompt(rng, 5) + phrase + phrase[:3]


def test_ngram_proposer_continues_the_longest_earlier_match():
    proposer = NgramProposer(SpeculativeConfig(ngram_max=3, ngram_min=1))
    assert proposer.lookup([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]  # "2 3" occurred before: "4 5" followed
    assert proposer.lookup([7, 1, 2, 8, 5, 1, 2, 9, 1, 2], 3) == [9, 1, 2]  # the most recent occurrence
    assert proposer.lookup([4, 5, 6, 1, 5, 6, 2, 4, 5, 6], 1) == [1]  # "4 5 6" beats the later "5 6"
    assert proposer.lookup([1, 2, 3], 4) == []  # nothing repeats
    assert proposer.lookup([3, 3, 3, 3], 4) == [3]  # a run proposes what the matched occurrence has after it


def test_the_pace_backs_off_a_sample_whose_proposals_fail():
    pace = SpeculationPace()
    assert pace.limit(8) == 8
    pace.record(8, 2, 8)
    assert pace.limit(8) == 3  # one more than were accepted
    pace.record(3, 3, 8)
    assert pace.limit(8) == 6  # all accepted: twice as many
    pace.record(6, 6, 8)
    assert pace.limit(8) == 8
    skipped = []
    for _ in range(6):  # nothing accepted: sit out 2, 4, 8 ... steps, then try one token
        pace.record(1, 0, 8)
        skipped.append(0)
        while pace.limit(8) == 0:
            skipped[-1] += 1
    assert skipped == [2, 4, 8, 16, 32, MAX_BACKOFF_STEPS]
    pace.record(1, 1, 8)
    assert pace.limit(8) == 2 and pace.misses == 0


def test_greedy_tokens_are_the_same_with_and_without_speculation(trained):
    rng = random.Random(11)
    work = [(rng.randrange(12), _repetitive_prompt(rng), greedy(rng.randint(8, 48))) for _ in range(20)]
    work += [(3, random_prompt(rng, 30), greedy(40)),  # no repetition: proposals come from the output only
             (6, _repetitive_prompt(rng), greedy(24, n=2)),  # forked samples speculate on their own
             (8, work[0][1], greedy(32)),  # a prefix-cache hit on an earlier prompt
             (9, _repetitive_prompt(rng), greedy(32, speculative=False))]  # opted out
    reference = run_with_arrivals(_engine(trained, None), work)
    engine = _engine(trained, SpeculativeConfig(num_speculative_tokens=4, max_batch_seqs=64))
    results = run_with_arrivals(engine, work)
    for request_id, want in reference.items():
        assert [s.token_ids for s in results[request_id].samples] == [s.token_ids for s in want.samples], request_id
    counters = engine.stats().counters
    assert counters.num_speculative_accepted_tokens > 0, "no proposal was ever accepted: the path went untested"
    assert counters.num_speculative_accepted_tokens < counters.num_speculative_proposed_tokens  # rejections too
    assert counters.num_steps < _engine_steps(trained, work)  # accepted proposals saved steps
    assert_no_leaks(engine)


def _engine_steps(trained, work) -> int:
    engine = _engine(trained, None)
    run_with_arrivals(engine, work)
    return engine.stats().counters.num_steps


def test_a_large_batch_does_not_speculate(trained):
    rng = random.Random(12)
    prompts = [_repetitive_prompt(rng) for _ in range(6)]
    engine = _engine(trained, SpeculativeConfig(max_batch_seqs=4))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"big{i}", prompt, greedy(16))
    engine.step()
    assert engine.scheduler.num_batch_seqs == 6 and engine.scheduler.propose is None
    while engine.has_unfinished_requests():
        engine.step()
    for i, prompt in enumerate(prompts[:2]):
        engine.add_request(f"small{i}", prompt, greedy(16))
    engine.step()
    assert engine.scheduler.propose is not None


@pytest.mark.parametrize("num_blocks", [NUM_BLOCKS, 24], ids=["roomy", "preempting"])
def test_stops_logprobs_and_preemption_under_speculation(trained, num_blocks):
    """Stop ids and strings inside accepted proposals, min_tokens, per-token logprobs, and a cache small enough
    that requests are preempted (and proposals then dropped rather than preempting): the same as without."""
    rng = random.Random(14)
    work = []
    for i in range(16):
        params = dict(max_tokens=rng.randint(16, 40), temperature=0.0, logprobs=2 if i % 3 == 0 else None,
                      min_tokens=4 if i % 4 == 0 else 0)
        if i % 2:
            params["stop_token_ids"] = tuple(rng.sample(range(3, 512), 40))
        work.append((rng.randrange(6), _repetitive_prompt(rng), SamplingParams(**params)))
    reference = run_with_arrivals(_engine(trained, None), work)
    engine = _engine(trained, SpeculativeConfig(max_batch_seqs=64, ngram_min=1), num_blocks=num_blocks)
    results = run_with_arrivals(engine, work)
    for request_id, want in reference.items():
        got = results[request_id].samples[0]
        assert (got.token_ids, got.finish_reason) == (want.samples[0].token_ids, want.samples[0].finish_reason)
        if want.samples[0].logprobs is not None:
            assert got.logprobs == pytest.approx(want.samples[0].logprobs, abs=1e-4)
            assert [[t for t, _ in top] for top in got.top_logprobs] == [[t for t, _ in top]
                                                                        for top in want.samples[0].top_logprobs]
    counters = engine.stats().counters
    if num_blocks == NUM_BLOCKS:
        assert counters.num_speculative_accepted_tokens > 0
    else:
        assert counters.num_preemptions > 0 and counters.num_speculative_proposed_tokens > 0
    assert sum(r.samples[0].finish_reason == "stop" for r in reference.values()) > 0  # stops were exercised
    assert_no_leaks(engine)


def _next_tokens(engine: LLMEngine, prompt: list[int], num_samples: int) -> list[tuple[int, ...]]:
    """The first 4 tokens of num_samples seeded samples (seeds 0..num_samples-1) at temperature 1."""
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True) for seed in range(num_samples)]
    return [tuple(r.samples[0].token_ids[:4]) for r in engine.generate([prompt] * num_samples, params)]


class _RepeatProposer(Proposer):
    """Proposes at every step (the tokens that end the sequence, again): at temperature 1 n-gram lookup
    rarely matches, and the verification step is what this test is about."""

    def propose(self, sample, max_tokens: int) -> list[int]:
        return (sample.prompt_token_ids + sample.output_token_ids)[-max_tokens:]


def _total_variation(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> float:
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in set(ca) | set(cb))


class _AcceptEverything(SampleProcessor):
    """A broken verification step: every proposal is taken as if the model had drawn it."""

    def sample(self, logits, targets):
        results, verifications = super().sample(logits, targets)
        for (_, sample, delta), target in zip(results, targets):
            proposed = target.proposed_token_ids
            if proposed and not sample.is_finished:
                kept = len(sample.output_token_ids) - len(delta.token_ids)
                del sample.output_token_ids[kept:]
                sample.output_token_ids.extend(proposed)
                delta.token_ids = list(proposed)
        for v in verifications:
            v.num_accepted = v.num_proposed - 1  # the last proposal's KV is never written: keep it uncomputed
        return results, verifications


def test_sampled_continuations_keep_the_model_distribution(trained):
    """2,000 seeded samples of the next 4 tokens: with speculation each seed gives exactly the tokens it gives
    without, so their distributions match (total variation 0, threshold 0.05); an engine whose verification
    accepts every proposal moves the distribution far past the threshold."""
    threshold = 0.05
    rng = random.Random(13)
    phrase = random_prompt(rng, 8)
    prompt = phrase + random_prompt(rng, 4) + phrase + phrase + phrase[:2]  # proposals at every step
    speculative = SpeculativeConfig(num_speculative_tokens=3, max_batch_seqs=64)
    without = _next_tokens(_engine(trained, None, max_num_seqs=64), prompt, 2000)
    engine = _engine(trained, speculative, max_num_seqs=64)
    engine.proposer = _RepeatProposer()
    spec = _next_tokens(engine, prompt, 2000)
    assert engine.stats().counters.num_speculative_proposed_tokens > 1000
    assert spec == without  # per seed
    assert _total_variation(spec, without) <= threshold
    broken = _engine(trained, speculative, max_num_seqs=64)
    broken.proposer = _RepeatProposer()
    broken.processor = _AcceptEverything(broken.sampler)
    distance = _total_variation(_next_tokens(broken, prompt, 2000), without)
    print(f"total variation: speculation {_total_variation(spec, without):.3f}, broken verifier {distance:.3f}")
    assert distance > threshold


def test_the_opt_out_travels_from_the_public_api_to_the_engine():
    from pdserve.router.client import sampling_params_to_proto
    from pdserve.runtime.sampling_proto import (
        engine_sampling_params_to_proto,
        sampling_params_from_engine_proto,
        sampling_params_from_proto,
    )
    from pdserve.v1 import router_pb2

    for opted_out in (False, True):
        public = sampling_params_from_proto(router_pb2.SamplingParams(no_speculation=opted_out, seed=1))
        assert public.speculative is not opted_out
        assert sampling_params_from_engine_proto(engine_sampling_params_to_proto(public)) == public
        assert sampling_params_to_proto(public).no_speculation is opted_out


@pytest.mark.parametrize("num_blocks", [NUM_BLOCKS, 12], ids=["roomy", "preempting"])
@pytest.mark.parametrize("draft_name", ["self", "other"])
def test_draft_model_speculation_gives_the_same_greedy_tokens(trained, drafts, draft_name, num_blocks):
    """Random arrivals, chunked prefill, a prefix-cache hit, n = 2, an opt-out, and (preempting) a cache so small
    that requests are preempted and recompute: the tokens of an engine without speculation. The model as its own
    draft has all but a handful of proposals accepted, which holds only if the draft's KV cache follows the block
    tables through all of that (a draft reading stale or foreign KV proposes wrong tokens)."""
    rng = random.Random(21)
    text = training_tokens(trained[2].backend).tolist()  # what both models learned: the other draft knows some
    work = [(rng.randrange(12), random_prompt(rng, rng.randint(4, 40)), greedy(rng.randint(8, 40)))
            for _ in range(8)]
    work += [(rng.randrange(12), text[start:start + rng.randint(8, 24)], greedy(rng.randint(8, 40)))
             for start in rng.sample(range(len(text) - 64), 8)]
    work += [(6, _repetitive_prompt(rng), greedy(24, n=2)), (8, work[0][1], greedy(32)),
             (9, random_prompt(rng, 20), greedy(32, speculative=False))]
    reference = run_with_arrivals(_engine(trained, None), work)
    engine = _engine(trained, _draft_config(num_speculative_tokens=3, max_batch_seqs=64), drafts[draft_name],
                     num_blocks=num_blocks)
    results = run_with_arrivals(engine, work)
    for request_id, want in reference.items():
        assert [s.token_ids for s in results[request_id].samples] == [s.token_ids for s in want.samples], request_id
    counters = engine.stats().counters
    assert counters.num_speculative_proposed_tokens > 100
    if draft_name == "self":
        assert counters.speculative_acceptance_rate > 0.97, counters
    else:
        assert 0 < counters.num_speculative_accepted_tokens < counters.num_speculative_proposed_tokens
    if num_blocks < NUM_BLOCKS:
        assert counters.num_preemptions > 0
    assert_no_leaks(engine)


def test_draft_model_sampling_keeps_the_model_distribution(trained, drafts):
    """2,000 seeded samples at temperature 1: a draft model's proposals leave every seed's tokens as they are
    without speculation; the model as its own draft, drawing with the same seeded noise, is accepted nearly
    always (the coupling); a broken verification step with the other draft moves the distribution past 0.05."""
    threshold = 0.05
    rng = random.Random(23)
    prompt = random_prompt(rng, 12)
    without = _next_tokens(_engine(trained, None, max_num_seqs=64), prompt, 2000)
    speculative = _draft_config(num_speculative_tokens=3, max_batch_seqs=64)
    for name in ("self", "other"):
        engine = _engine(trained, speculative, drafts[name], max_num_seqs=64)
        assert _next_tokens(engine, prompt, 2000) == without, name
        counters = engine.stats().counters
        assert counters.num_speculative_proposed_tokens > 1000
        if name == "self":
            assert counters.speculative_acceptance_rate > 0.97, counters
    broken = _engine(trained, speculative, drafts["other"], max_num_seqs=64)
    broken.processor = _AcceptEverything(broken.sampler)
    distance = _total_variation(_next_tokens(broken, prompt, 2000), without)
    print(f"total variation with a broken verifier and the other draft: {distance:.3f}")
    assert distance > threshold


def test_a_draft_runner_must_fit_the_engine(trained, drafts):
    model, config, tokenizer = trained
    with pytest.raises(ValueError, match="draft runner"):
        LLMEngine(ModelRunner(model, config, 64, BLOCK_SIZE), tokenizer,
                  EngineConfig(block_size=BLOCK_SIZE, speculative=_draft_config()))
    with pytest.raises(ValueError, match="must cover"):
        LLMEngine(ModelRunner(model, config, 64, BLOCK_SIZE), tokenizer,
                  EngineConfig(block_size=BLOCK_SIZE, speculative=_draft_config()), ModelRunner(model, config, 32, 16))
    with pytest.raises(ValueError, match="--draft-model"):
        SpeculativeConfig(method="draft")


def test_build_engine_loads_a_draft_and_refuses_one_with_another_tokenizer(tmp_path):
    from pdserve.engine.setup import EngineArgs, build_engine

    model_dir = make_tiny_model(tmp_path / "model", size="tiny")
    args = EngineArgs(model=str(model_dir), kv_cache_mb=4, speculative="draft", draft_model=str(model_dir))
    engine, _ = build_engine(args)
    assert engine.proposer.runner.num_blocks == engine.runner.num_blocks
    foreign = make_tiny_model(tmp_path / "foreign", size="tiny", tokenizer_size="small")
    with pytest.raises(ValueError, match="tokenizer differs"):
        build_engine(EngineArgs(model=str(model_dir), kv_cache_mb=4, speculative="draft", draft_model=str(foreign)))


def test_the_flag_offers_every_speculative_method():
    from pdserve.cli import flags
    from pdserve.engine import speculation

    assert flags.SPECULATIVE_METHODS == speculation.SPECULATIVE_METHODS  # the flag module stays torch-free


def test_draft_catch_up_is_split_to_the_step_budget_and_identical(trained, drafts):
    """A step budget of 8 tokens: the draft catches up on 30-token prompts in forwards of at most 8 tokens, and
    still proposes what the model draws."""
    rng = random.Random(25)
    work = [(i, random_prompt(rng, 30), greedy(24)) for i in range(4)]
    reference = run_with_arrivals(_engine(trained, None, max_num_batched_tokens=8), work)
    engine = _engine(trained, _draft_config(num_speculative_tokens=3, max_batch_seqs=64), drafts["self"],
                     max_num_batched_tokens=8)
    sizes = []
    execute = engine.proposer.runner.execute
    engine.proposer.runner.execute = lambda chunks, **kw: sizes.append(sum(len(c.token_ids) for c in chunks)) or \
        execute(chunks, **kw)
    results = run_with_arrivals(engine, work)
    assert {r: [s.token_ids for s in g.samples] for r, g in results.items()} == \
        {r: [s.token_ids for s in g.samples] for r, g in reference.items()}
    assert max(sizes) <= 8 and engine.stats().counters.speculative_acceptance_rate > 0.97


def test_a_draft_with_a_smaller_vocabulary_takes_any_prompt(tmp_path):
    """A draft whose vocabulary is smaller than the model's (as Qwen2.5-0.5B's for 7B): prompt ids past it reach
    the draft as a stand-in id instead of crashing the step."""
    model_dir = make_tiny_model(tmp_path / "model", size="tiny", tokenizer_size="small")  # 1024 ids
    draft_dir = make_tiny_model(tmp_path / "draft", size="tiny")  # 512 ids
    model, config = load_model(model_dir, dtype=torch.float32)
    draft = load_model(draft_dir, dtype=torch.float32)
    trained = (model, config, Tokenizer.from_dir(model_dir))
    prompts = [[900, 1000, 5, 700, 6, 1020, 7] * 3, [600 + i for i in range(20)]]
    want = _engine(trained, None).generate(prompts, greedy(16))
    engine = _engine(trained, _draft_config(max_batch_seqs=64), draft)
    got = engine.generate(prompts, greedy(16))
    assert [r.samples[0].token_ids for r in got] == [r.samples[0].token_ids for r in want]
    assert engine.stats().counters.num_speculative_proposed_tokens > 0


def test_each_request_output_counts_its_own_speculation(trained, drafts):
    rng = random.Random(27)
    engine = _engine(trained, _draft_config(max_batch_seqs=64), drafts["other"])
    for i in range(3):
        engine.add_request(f"q{i}", _repetitive_prompt(rng), greedy(24, speculative=i != 2))
    last = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = (out.speculative_proposed_tokens, out.speculative_accepted_tokens)
    counters = engine.stats().counters
    assert last["q2"] == (0, 0)  # opted out
    assert sum(p for p, _ in last.values()) == counters.num_speculative_proposed_tokens > 0
    assert sum(a for _, a in last.values()) == counters.num_speculative_accepted_tokens


def test_each_method_has_its_measured_batch_default_and_prefill_servers_do_not_speculate(trained, drafts, tmp_path):
    import argparse

    from pdserve.cli import serve
    from pdserve.engine.setup import EngineArgs

    assert SpeculativeConfig().max_batch_seqs == 4 and _draft_config().max_batch_seqs == 1
    args = EngineArgs(model="m", speculative="draft", draft_model="d")
    assert args.speculative_config().max_batch_seqs == 1
    engine = _engine(trained, _draft_config(), drafts["self"])  # the default: a batch of two does not speculate
    rng = random.Random(29)
    for i in range(2):
        engine.add_request(f"d{i}", random_prompt(rng, 12), greedy(8))
    engine.step()
    engine.step()
    assert engine.scheduler.propose is None and engine.stats().counters.num_speculative_proposed_tokens == 0
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    model_dir = make_tiny_model(tmp_path / "m", size="tiny")
    for role, method in (("prefill", None), ("decode", "draft")):
        ns = parser.parse_args(["serve", role, "--model", str(model_dir), "--speculative", "draft",
                                "--draft-model", str(model_dir)])
        config = serve.settings_from(ns).engine.speculative_config()
        assert (config.method if config else None) == method, role


def test_the_pace_keeps_its_length_when_the_budget_cut_the_proposals():
    pace = SpeculationPace()
    pace.record(1, 1, 4)  # the step's budget left room for one proposal, and it was accepted
    assert pace.limit(4) == 4
