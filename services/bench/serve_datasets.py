"""Workloads of the serving benchmark: request lengths, and the prompts (random token ids) built
from them.

Datasets:
  random      prompt and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)];
  sharegpt    (prompt, output) length pairs drawn from the synthetic ShareGPT-like distribution
              shipped in services/bench/data/sharegpt_like_lengths.csv (see serve_sharegpt);
  mixed       chat-like short requests with a share of long prompts that arrive while others decode
              (the disaggregation workload: a long prefill stalls a colocated worker's decodes).
Prompts are random token ids (no text): lengths are what a serving benchmark controls.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdserve.bench.serve_sharegpt import load_sharegpt_like

FIRST_TOKEN_ID = 3  # below this the tiny tokenizers keep their special tokens
DATASETS = ("random", "sharegpt", "mixed")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its prompt token ids and how many tokens it must generate."""

    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class DatasetSpec:
    """How to build a workload (the `--dataset-*` flags).

    random: input_len, output_len, range_ratio; sharegpt: sharegpt_output_len overrides the
    shipped output lengths when set; mixed: short requests as `random`, and with probability
    long_fraction a long prompt of long_prompt_len tokens generating long_output_len tokens.
    """

    name: str = "random"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    long_prompt_len: int = 1024
    long_output_len: int = 8
    long_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.name in DATASETS, f"dataset must be one of {', '.join(DATASETS)}, got {self.name!r}"),
            (self.num_prompts >= 1, f"num_prompts must be >= 1, got {self.num_prompts}"),
            (self.input_len >= 1 and self.output_len >= 1,
             f"input_len and output_len must be >= 1, got {self.input_len}, {self.output_len}"),
            (0.0 <= self.range_ratio < 1.0, f"range_ratio must be in [0, 1), got {self.range_ratio}"),
            (self.sharegpt_output_len is None or self.sharegpt_output_len >= 1,
             f"sharegpt_output_len must be >= 1, got {self.sharegpt_output_len}"),
            (self.long_prompt_len >= 1 and self.long_output_len >= 1,
             f"long_prompt_len and long_output_len must be >= 1, got {self.long_prompt_len}, "
             f"{self.long_output_len}"),
            (0.0 <= self.long_fraction <= 1.0, f"long_fraction must be in [0, 1], got {self.long_fraction}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"dataset: {message}")


def sample_lengths(spec: DatasetSpec, rng: random.Random) -> list[tuple[int, int]]:
    """(prompt_len, output_len) for each of spec.num_prompts requests, reproducible from rng."""
    if spec.name == "sharegpt":
        pairs = load_sharegpt_like()
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(spec.num_prompts)]
        return [(p, spec.sharegpt_output_len or o) for p, o in chosen]
    lengths = []
    for _ in range(spec.num_prompts):
        if spec.name == "mixed" and rng.random() < spec.long_fraction:
            lengths.append((spec.long_prompt_len, spec.long_output_len))
        else:
            lengths.append((_around(rng, spec.input_len, spec.range_ratio),
                            _around(rng, spec.output_len, spec.range_ratio)))
    return lengths


def _around(rng: random.Random, length: int, range_ratio: float) -> int:
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.randint(low, high)


def build_requests(spec: DatasetSpec, vocab_size: int, max_model_len: int) -> list[BenchRequest]:
    """The workload: random prompt ids in [3, vocab_size) with the sampled lengths. A request longer
    than max_model_len is shortened (its prompt first, keeping one output token) so that every
    request is servable."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids")
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    rng = random.Random(spec.seed)
    requests = []
    for prompt_len, output_len in sample_lengths(spec, rng):
        output_len = min(output_len, max_model_len - 1)
        prompt_len = min(prompt_len, max_model_len - output_len)
        ids = tuple(rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(prompt_len))
        requests.append(BenchRequest(ids, output_len))
    return requests


def describe(requests: list[BenchRequest]) -> dict:
    """Counts and means of a workload (for reports)."""
    n = len(requests)
    prompt = [r.prompt_len for r in requests]
    output = [r.output_len for r in requests]
    return {"num_requests": n, "total_input_tokens": sum(prompt), "total_output_tokens": sum(output),
            "mean_input_len": sum(prompt) / n if n else 0.0, "mean_output_len": sum(output) / n if n else 0.0,
            "max_input_len": max(prompt, default=0), "max_output_len": max(output, default=0)}
