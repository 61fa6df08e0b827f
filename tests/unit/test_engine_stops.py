"""Stop conditions through the real engine: eos, stop token ids, stop strings, min/max tokens."""

from __future__ import annotations

import random

import pytest

from helpers.engine_testing import greedy, load_tiny, one_torch_thread, random_prompt, run_alone
from pdserve.models.sampling_params import SamplingParams

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        yield load_tiny(tmp_path_factory.mktemp("tiny_llama_stops"))


@pytest.fixture(scope="module")
def reference(tiny):
    """A prompt, its greedy tokens (EOS ignored) and the text each token added."""
    prompt = random_prompt(random.Random(11), 12)
    engine = tiny.engine()
    engine.add_request("ref", prompt, greedy(MAX_TOKENS))
    tokens, deltas = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            (sample,) = out.samples
            tokens.extend(sample.token_ids)
            deltas.extend([sample.text] * len(sample.token_ids))
    assert len(tokens) == MAX_TOKENS
    return prompt, tokens, deltas


def _plain(text: str) -> bool:
    return text.isprintable() and "\ufffd" not in text


def _boundary_stop(deltas, span: int):
    """(stop string, token index k where it completes, char position) for a stop string that
    starts inside token k - span + 1's text and ends inside token k's, occurring once."""
    full = "".join(deltas)
    for k in range(span, len(deltas) - 1):
        first, last = deltas[k - span + 1], deltas[k]
        middle = "".join(deltas[k - span + 2:k])
        if len(first) >= 2 and len(last) >= 2 and _plain(first + middle + last):
            stop = first[-2:] + middle + last[:1]
            position = len("".join(deltas[:k - span + 2])) - 2
            if full.find(stop) == position and full.count(stop) == 1:
                return stop, k, position
    pytest.fail(f"no usable token boundary in the reference text {full!r}")


def _run_stepwise(tiny, prompt, params):
    """(tokens, list of the cumulative text after each step, finish reason)."""
    engine = tiny.engine()
    engine.add_request("x", prompt, params)
    tokens, text, texts, reason = [], "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            (sample,) = out.samples
            tokens += sample.token_ids
            text += sample.text
            texts.append(text)
            reason = sample.finish_reason or reason
    return tokens, texts, reason


def test_max_tokens_finishes_with_length(tiny, reference):
    prompt, tokens, deltas = reference
    result = run_alone(tiny, prompt, greedy(7)).samples[0]
    assert result.token_ids == tokens[:7] and result.finish_reason == "length"
    assert result.text.startswith("".join(deltas[:7]))  # plus any character the 7th token began


@pytest.mark.parametrize("span", [2, 3])
def test_stop_string_across_token_boundaries_is_cut_and_held_back(tiny, reference, span):
    prompt, tokens, deltas = reference
    stop, k, position = _boundary_stop(deltas, span)
    full = "".join(deltas)
    got, texts, reason = _run_stepwise(tiny, prompt, greedy(MAX_TOKENS, stop=("zzzzzz", stop)))
    assert reason == "stop" and got == tokens[:k + 1]
    assert texts[-1] == full[:position]
    # No step ever released text of the stop string, not even while it was undecided.
    assert all(full[:position].startswith(t) for t in texts)


def test_stop_token_id_stops_and_keeps_the_token_but_not_its_text(tiny, reference):
    prompt, tokens, deltas = reference
    k = next(i for i in range(3, MAX_TOKENS) if tokens[i] not in tokens[:i])
    result = run_alone(tiny, prompt, greedy(MAX_TOKENS, stop_token_ids=(tokens[k],))).samples[0]
    assert result.token_ids == tokens[:k + 1] and result.finish_reason == "stop"
    assert result.text == run_alone(tiny, prompt, greedy(k)).samples[0].text


def test_min_tokens_masks_an_early_stop_token(tiny, reference):
    prompt, tokens, _ = reference
    k = next(i for i in range(2, MAX_TOKENS) if tokens[i] not in tokens[:i])
    params = greedy(MAX_TOKENS, stop_token_ids=(tokens[k],), min_tokens=k + 1)
    result = run_alone(tiny, prompt, params).samples[0]
    assert result.token_ids[:k] == tokens[:k] and result.token_ids[k] != tokens[k]
    assert tokens[k] not in result.token_ids[:k + 1]


def test_min_tokens_ignores_an_early_stop_string(tiny, reference):
    prompt, tokens, deltas = reference
    stop, k, _ = _boundary_stop(deltas, 2)
    result = run_alone(tiny, prompt, greedy(MAX_TOKENS, stop=(stop,), min_tokens=k + 2)).samples[0]
    assert result.token_ids == tokens and result.finish_reason == "length"
    assert result.text == "".join(deltas)


def _prompt_with_greedy_eos(tiny):
    """A prompt whose greedy continuation hits EOS at index >= 2 (found by a seeded search)."""
    (eos,) = tiny.tokenizer.eos_token_ids
    rng = random.Random(0)
    prompts = [random_prompt(rng, rng.randint(4, 20)) for _ in range(256)]
    results = tiny.engine(max_num_seqs=128).generate(prompts, greedy(MAX_TOKENS))
    for prompt, result in zip(prompts, results):
        tokens = result.samples[0].token_ids
        if eos in tokens[2:] and eos not in tokens[:2]:
            return prompt, tokens, tokens.index(eos), eos
    pytest.fail("no prompt among 256 makes the tiny model emit EOS greedily")


def test_eos_stops_unless_ignored_or_before_min_tokens(tiny):
    prompt, tokens, e, eos = _prompt_with_greedy_eos(tiny)
    stopped = run_alone(tiny, prompt, greedy(MAX_TOKENS, ignore_eos=False)).samples[0]
    assert stopped.token_ids == tokens[:e + 1] and stopped.finish_reason == "stop"
    ignored = run_alone(tiny, prompt, greedy(MAX_TOKENS, ignore_eos=True)).samples[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"
    held = run_alone(tiny, prompt, greedy(MAX_TOKENS, ignore_eos=False, min_tokens=e + 1)).samples[0]
    assert held.token_ids[:e] == tokens[:e] and eos not in held.token_ids[:e + 1]


def test_logprobs_are_returned_per_token(tiny, reference):
    prompt, tokens, _ = reference
    result = run_alone(tiny, prompt, greedy(5, logprobs=3)).samples[0]
    assert result.token_ids == tokens[:5]
    assert len(result.logprobs) == 5 and len(result.top_logprobs) == 5
    for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs):
        assert len(top) == 3 and top[0][0] == token and top[0][1] == pytest.approx(logprob)
        assert logprob <= 0.0 and top[0][1] >= top[1][1] >= top[2][1]
    none = run_alone(tiny, prompt, SamplingParams(max_tokens=2, temperature=0.0)).samples[0]
    assert none.logprobs is None and none.top_logprobs is None
