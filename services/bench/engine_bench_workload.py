"""The engine benchmark's workload: fixed-seed random prompts and capped-exponential output lengths,
the same for every system measured."""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_TOKEN_ID = 3  # below this the tiny tokenizers keep their special tokens


@dataclass(frozen=True)
class Workload:
    """num_requests prompts of prompt_len token ids each, and how many tokens each must produce.

    prompts[i]: list of prompt_len ints; output_lens[i]: 1 <= L <= the cap.
    """

    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]

    @property
    def num_requests(self) -> int:
        """How many requests the workload holds."""
        return len(self.prompts)

    @property
    def total_output_tokens(self) -> int:
        """Output tokens of the whole workload (what every system must produce)."""
        return sum(self.output_lens)


def capped_exponential_lengths(rng: random.Random, count: int, mean: float, cap: int) -> list[int]:
    """count lengths drawn from an exponential of the given mean, rounded, clamped to [1, cap]."""
    if mean <= 0 or cap < 1:
        raise ValueError(f"output lengths need mean > 0 and cap >= 1, got mean {mean}, cap {cap}")
    return [min(cap, max(1, round(rng.expovariate(1.0 / mean)))) for _ in range(count)]


def make_workload(num_requests: int, prompt_len: int, mean_output: float, max_output: int,
                  vocab_size: int, seed: int = 0) -> Workload:
    """A reproducible workload: prompts of uniform random ids in [3, vocab_size), then lengths."""
    if num_requests < 1 or prompt_len < 1:
        raise ValueError(f"need num_requests >= 1 and prompt_len >= 1, got {num_requests}, {prompt_len}")
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids")
    rng = random.Random(seed)
    prompts = tuple(tuple(rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(prompt_len))
                    for _ in range(num_requests))
    lengths = capped_exponential_lengths(rng, num_requests, mean_output, max_output)
    return Workload(prompts, tuple(lengths))


def spread_subset(count: int, size: int) -> list[int]:
    """size indices spread evenly over range(count) (all of them when size >= count)."""
    if size >= count:
        return list(range(count))
    if size < 1:
        raise ValueError(f"a subset needs at least one request, got {size}")
    return [i * count // size for i in range(size)]
