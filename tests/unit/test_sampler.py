"""Sampler tests: filters against a brute-force reference, seeded determinism across batches,
penalties, min_tokens, greedy, logprobs and the sampled distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pdserve.models.sampler import Sampler, SamplingRow
from pdserve.models.sampling_filters import apply_top_k_top_p_min_p
from pdserve.models.sampling_noise import mix64, row_key, row_keys_tensor, token_hashes
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.sampling_penalties import apply_penalties

EOS = 2


def make_row(params: SamplingParams, seed: int = 0, sample_index: int = 0, position: int = 0,
             prompt=(5, 6, 7), output=()) -> SamplingRow:
    return SamplingRow(params, seed, sample_index, position, list(prompt), list(output))


# ---------------------------------------------------------------- brute-force filter reference

AMBIGUOUS = None  # the reference returns this when float32 vs float64 could legitimately differ
MARGIN = 1e-4  # relative, for min-p ratios; float32 rounding of a logit threshold is ~1e-6
MASS_MARGIN = 2e-5  # absolute, for top-p cumulative mass; float32 cumsum error is ~1e-6


def reference_kept(row: list[float], top_k: int, top_p: float, min_p: float):
    """Indices a straightforward loop keeps (min-p, then top-k, then top-p on the renormalized
    survivors, ties at each boundary kept), or AMBIGUOUS when a comparison is within MARGIN."""
    finite = [i for i, x in enumerate(row) if x != -math.inf]
    best = max(row[i] for i in finite)
    kept = []
    for i in finite:
        ratio = math.exp(row[i] - best)
        if min_p > 0 and ratio != 1.0 and abs(ratio - min_p) < MARGIN * min_p:
            return AMBIGUOUS
        if ratio >= min_p:
            kept.append(i)
    if 0 < top_k < len(row):
        kth = sorted(row, reverse=True)[top_k - 1]
        kept = [i for i in kept if row[i] >= kth]
    if top_p < 1.0:
        kept.sort(key=lambda i: -row[i])
        weights = [math.exp(row[i] - best) for i in kept]
        total = sum(weights)
        mass_before, last_kept = 0.0, None
        for i, w in zip(kept, weights):
            if mass_before > 0 and abs(mass_before - top_p) < MASS_MARGIN:
                return AMBIGUOUS
            if mass_before >= top_p:
                break
            last_kept = row[i]
            mass_before += w / total
        kept = [i for i in kept if row[i] >= last_kept]
    return sorted(kept)


def random_filter_case(rng: random.Random, vocab: int):
    """(logits row, top_k, top_p, min_p), often with ties and edge values."""
    if rng.random() < 0.5:
        row = [rng.randint(-6, 6) / 2 for _ in range(vocab)]  # many exact ties
    else:
        row = [rng.gauss(0, 2.5) for _ in range(vocab)]
    if vocab > 1 and rng.random() < 0.2:
        row[rng.randrange(vocab)] = -math.inf  # e.g. a min_tokens mask
    top_k = rng.choice([0, -1, 1, 2, 3, vocab - 1, vocab, vocab + 5, rng.randint(1, vocab)])
    top_p = rng.choice([1.0, 1.0, 0.999, 0.5, 1e-6, rng.random() or 0.5])
    min_p = rng.choice([0.0, 0.0, 1.0, 0.05, rng.random()])
    return row, top_k, top_p, min_p


@pytest.mark.parametrize("vocab", [1, 2, 5, 16, 97])
def test_filters_keep_exactly_what_brute_force_keeps(vocab):
    rng = random.Random(1000 + vocab)
    cases = [random_filter_case(rng, vocab) for _ in range(300)]
    logits = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    out = apply_top_k_top_p_min_p(
        logits,
        torch.tensor([c[1] for c in cases]),
        torch.tensor([c[2] for c in cases]),
        torch.tensor([c[3] for c in cases]),
    )
    compared = 0
    for r, (row, top_k, top_p, min_p) in enumerate(cases):
        row32 = logits[r].tolist()  # the exact float32 values the filter saw
        expected = reference_kept(row32, top_k, top_p, min_p)
        if expected is AMBIGUOUS:
            continue
        compared += 1
        got = torch.nonzero(torch.isfinite(out[r])).flatten().tolist()
        assert got == expected, (row32, top_k, top_p, min_p)
        assert torch.equal(out[r][got], logits[r][got])  # survivors keep their values
    assert compared >= 0.95 * len(cases)


def test_filter_edge_values():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, -1.0]] * 6)
    out = apply_top_k_top_p_min_p(
        logits,
        top_k=torch.tensor([1, 0, 0, 2, 0, 3]),
        top_p=torch.tensor([1.0, 1.0, 1e-6, 1.0, 1.0, 1.0]),
        min_p=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
    )
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in out]
    assert kept[0] == [1, 2]  # top_k=1 keeps both tokens tied for first
    assert kept[1] == [1, 2]  # min_p=1 keeps exactly the max ties
    assert kept[2] == [1, 2]  # a tiny top_p keeps the first token and its tie
    assert kept[3] == [1, 2]
    assert kept[4] == [0, 1, 2, 3, 4]
    assert kept[5] == [0, 1, 2]
    off = apply_top_k_top_p_min_p(logits, torch.zeros(6, dtype=torch.int64), torch.ones(6),
                                  torch.zeros(6))
    assert torch.equal(off, logits)


def test_filter_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="top_p"):
        apply_top_k_top_p_min_p(torch.zeros(2, 4), torch.zeros(2), torch.ones(3), torch.zeros(2))


# ---------------------------------------------------------------- noise

def test_token_hashes_match_pure_python_splitmix64():
    keys = [0, 1, 2**63, 2**64 - 1, row_key(12345, 3, 77)]
    hashes = token_hashes(row_keys_tensor(keys, "cpu"), 9)
    gamma = 0x9E3779B97F4A7C15
    for r, key in enumerate(keys):
        for v in range(9):
            expected = mix64(key + (v + 1) * gamma)
            assert hashes[r, v].item() & (2**64 - 1) == expected


def test_row_key_separates_its_inputs():
    keys = {row_key(s, i, p) for s in (0, 1, 2**64 - 1) for i in range(3) for p in range(5)}
    assert len(keys) == 45
    with pytest.raises(ValueError, match="seed"):
        row_key(2**64, 0, 0)


# ---------------------------------------------------------------- seeded determinism

def step_logits(position: int, batch: int, vocab: int = 50) -> torch.Tensor:
    gen = torch.Generator().manual_seed(position)
    return torch.randn(batch, vocab, generator=gen) * 3


OTHER_PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.02),
    SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(min_tokens=8, stop_token_ids=(3, 4), logprobs=5),
    SamplingParams(temperature=0.5, logprobs=2),
    SamplingParams(top_k=1),
    SamplingParams(temperature=2.0, ignore_eos=True, min_tokens=3),
]


def generate(params: SamplingParams, seed: int, steps: int, others: bool, sample_index=0):
    """Token ids a row produces over `steps` positions, alone or as row 3 of a batch of 9."""
    sampler = Sampler(eos_token_ids={EOS})
    tokens, other_outputs = [], [[] for _ in OTHER_PARAMS]
    for pos in range(steps):
        own = make_row(params, seed, sample_index, pos, output=tokens)
        if not others:
            logits = step_logits(pos, 9)[3:4]
            tokens.append(int(sampler(logits, [own]).token_ids[0]))
            continue
        rows = [make_row(p, seed=100 + j, position=pos, output=other_outputs[j])
                for j, p in enumerate(OTHER_PARAMS)]
        rows.insert(3, own)
        out = sampler(step_logits(pos, 9), rows).token_ids.tolist()
        tokens.append(out.pop(3))
        for j, t in enumerate(out):
            other_outputs[j].append(t)
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.01,
                   repetition_penalty=1.2, frequency_penalty=0.4, logprobs=3),
])
def test_seeded_row_same_alone_and_in_batch(params):
    alone = generate(params, seed=2**63 + 17, steps=20, others=False)
    batched = generate(params, seed=2**63 + 17, steps=20, others=True)
    assert alone == batched
    assert len(set(alone)) > 3  # it really sampled


def test_different_seeds_and_sample_indices_differ():
    params = SamplingParams(temperature=1.0)
    base = generate(params, seed=1, steps=20, others=False)
    assert generate(params, seed=1, steps=20, others=False) == base
    assert generate(params, seed=2, steps=20, others=False) != base
    assert generate(params, seed=1, steps=20, others=False, sample_index=1) != base


# ---------------------------------------------------------------- penalties, min_tokens, greedy

def reference_penalized(logits: list[float], prompt, output, rep, freq, pres) -> list[float]:
    result = list(logits)
    for t in set(prompt) | set(output):
        result[t] = result[t] / rep if result[t] > 0 else result[t] * rep
    for t in set(output):
        result[t] -= freq * output.count(t) + pres
    return result


def test_penalties_match_reference():
    rng = random.Random(7)
    vocab, rows, expected = 12, [], []
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(7)) * 2
    for r in range(6):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        no_penalty = r == 2  # a row without penalties in the middle of the batch
        params = SamplingParams(
            temperature=0.0, repetition_penalty=1.0 if no_penalty else rng.choice([0.7, 1.8]),
            frequency_penalty=0.0 if no_penalty else rng.uniform(-2, 2),
            presence_penalty=0.0 if no_penalty else rng.uniform(-2, 2))
        rows.append(make_row(params, prompt=prompt, output=output))
        expected.append(reference_penalized(logits[r].tolist(), prompt, output,
                                            params.repetition_penalty, params.frequency_penalty,
                                            params.presence_penalty))
    expected = torch.tensor(expected)
    penalized = apply_penalties(
        logits, [r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows],
        *(torch.tensor([getattr(r.params, name) for r in rows])
          for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")))
    assert torch.allclose(penalized, expected, atol=1e-5)
    before = logits.clone()
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)  # the caller's logits are not modified
    assert out.token_ids.tolist() == expected.argmax(dim=-1).tolist()
    assert not torch.equal(expected.argmax(dim=-1), logits.argmax(dim=-1))  # penalties mattered


def test_penalties_reject_out_of_vocabulary_ids():
    row = make_row(SamplingParams(repetition_penalty=1.5), prompt=[3, 99])
    with pytest.raises(ValueError, match="prompt token id 99"):
        Sampler()(torch.zeros(1, 10), [row])


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.full((1, 8), -5.0)
    logits[0, EOS], logits[0, 6], logits[0, 4] = 10.0, 9.0, 1.0
    sampler = Sampler(eos_token_ids={EOS})
    def pick(params, position):
        return int(sampler(logits, [make_row(params, position=position)]).token_ids[0])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(6,))
    assert pick(params, 2) == 4  # neither EOS nor the stop id while position < min_tokens
    assert pick(params, 3) == EOS
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(6,), ignore_eos=True)
    assert pick(ignoring, 0) == EOS  # ignore_eos: EOS may be produced, the stop id may not
    assert sampler.blocked_token_ids(make_row(ignoring, position=0)) == [6]
    seeded = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=(6,))
    draws = {int(sampler(logits, [make_row(seeded, seed=s)]).token_ids[0]) for s in range(50)}
    assert EOS not in draws and 6 not in draws


def test_greedy_is_argmax_and_ignores_seed_and_filters():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(3))
    rows = [make_row(SamplingParams(temperature=0.0, top_k=3, top_p=0.1), seed=s) for s in range(5)]
    out = Sampler()(logits.to(torch.bfloat16), rows)
    assert out.token_ids.tolist() == logits.to(torch.bfloat16).float().argmax(dim=-1).tolist()
    assert out.token_ids.dtype == torch.int64 and out.top_token_ids is None


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_and_top_n_is_batch_max():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    rows = [make_row(SamplingParams(temperature=0.3, repetition_penalty=2.0, logprobs=4), seed=1),
            make_row(SamplingParams(temperature=0.0, logprobs=1)),
            make_row(SamplingParams(top_k=2), seed=9)]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.logprobs.dtype == torch.float32
    assert out.top_token_ids.shape == (3, 4) and out.top_logprobs.shape == (3, 4)
    expected_values, expected_ids = raw.topk(4, dim=-1)
    assert torch.equal(out.top_token_ids, expected_ids)
    assert torch.allclose(out.top_logprobs, expected_values)


# ---------------------------------------------------------------- the sampled distribution

def empirical_counts(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> list[int]:
    rows = [make_row(params, seed=s) for s in range(draws)]
    tokens = Sampler()(logits_row.expand(draws, -1), rows).token_ids
    return torch.bincount(tokens, minlength=logits_row.shape[0]).tolist()


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs) if p > 0)


def test_sampled_distribution_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits, dim=0).tolist()
    counts = empirical_counts(logits, SamplingParams(temperature=1.0), 20000)
    assert chi_square(counts, probs) < 25.0  # 5 degrees of freedom; p < 1e-4 by chance
    hot = torch.softmax(logits / 2.0, dim=0).tolist()
    counts = empirical_counts(logits, SamplingParams(temperature=2.0), 20000)
    assert chi_square(counts, hot) < 25.0


def test_sampled_distribution_with_top_k_is_renormalized():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    counts = empirical_counts(logits, SamplingParams(temperature=1.0, top_k=3), 20000)
    assert counts[3:] == [0, 0, 0]
    probs = torch.softmax(logits[:3], dim=0).tolist() + [0.0] * 3
    assert chi_square(counts, probs) < 20.0  # 2 degrees of freedom


# ---------------------------------------------------------------- bad input and edges

def test_bad_inputs_raise_clear_errors():
    sampler = Sampler()
    row = make_row(SamplingParams())
    with pytest.raises(ValueError, match="rows"):
        sampler(torch.zeros(2, 5), [row])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sampler(torch.zeros(5), [row])
    with pytest.raises(ValueError, match="floating-point"):
        sampler(torch.zeros(1, 5, dtype=torch.int64), [row])
    with pytest.raises(ValueError, match="seed"):
        sampler(torch.zeros(1, 5), [make_row(SamplingParams(), seed=-1)])


def test_empty_batch_and_tiny_vocab():
    out = Sampler()(torch.zeros(0, 7), [])
    assert out.token_ids.shape == (0,) and out.top_token_ids is None
    out = Sampler()(torch.zeros(1, 3), [make_row(SamplingParams(logprobs=20), seed=5)])
    assert out.top_token_ids.shape == (1, 3)  # N capped at the vocabulary size
