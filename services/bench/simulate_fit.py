"""Fit the simulator's step costs on this machine: time real engine steps of known shapes
(prompts of many lengths, alone and packed; decode batches of many sizes and contexts) and solve
a least-squares fit of the StepCosts model, weighted so every step counts by its relative error."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import numpy as np

from pdserve.bench.simulate_costs import FEATURES, StepCosts, StepShape
from pdserve.engine.setup import EngineArgs, build_engine
from pdserve.models.sampling_params import SamplingParams

PROMPT_LENS = (16, 64, 128, 256, 512, 768, 1024, 1536, 2048)
PACKED = ((4, 128), (8, 64), (2, 512), (16, 32))  # (prompts, tokens each) in one step
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (32, 256)


@dataclass(frozen=True)
class StepSample:
    """One timed engine step: its shape and seconds."""

    shape: StepShape
    seconds: float


class EngineProbe:
    """Runs steps of known shapes on a fresh engine (prefix caching off, so every prompt is
    computed) and times engine.step() as a server's engine thread runs it."""

    def __init__(self, args: EngineArgs, seed: int = 0):
        self.engine, _ = build_engine(args)
        self.vocab = self.engine.runner.config.vocab_size
        self.rng = random.Random(seed)
        self.count = 0

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def _add(self, prompt_len: int, max_tokens: int) -> None:
        self.count += 1
        self.engine.add_request(f"fit-{self.count}", self._prompt(prompt_len),
                                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    def _timed_step(self) -> float:
        start = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - start

    def prefill(self, lengths: list[int]) -> StepSample:
        """One step computing these whole prompts together (each then finishes with one token)."""
        for n in lengths:
            self._add(n, 1)
        seconds = self._timed_step()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return StepSample(StepShape(tuple((n, 0) for n in lengths)), seconds)

    def decode(self, batch: int, context: int, steps: int) -> StepSample:
        """`steps` decode steps of `batch` sequences whose prompts hold `context` tokens; the
        median step, with the contexts of the middle step."""
        for _ in range(batch):
            self._add(context, steps + 1)
        while any(r.samples[0].num_computed_tokens < context for r in self.engine.scheduler.running) \
                or self.engine.scheduler.waiting:
            self.engine.step()
        seconds = statistics.median(self._timed_step() for _ in range(steps))
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return StepSample(StepShape(decode_contexts=(context + steps // 2,) * batch), seconds)


def measure(args: EngineArgs, max_prompt: int = 2048, repeats: int = 3, decode_steps: int = 9,
            seed: int = 0) -> list[StepSample]:
    """Timed steps over the plan above (prompt lengths up to max_prompt; each prefill shape's
    time is the median of `repeats` runs, against noise from other processes)."""
    probe = EngineProbe(args, seed)
    budget = probe.engine.config.max_num_batched_tokens
    probe.prefill([16])  # warm-up: first-call allocations are not a step cost
    probe.decode(2, 16, 2)
    samples = []
    shapes = [[n] for n in PROMPT_LENS if n <= min(max_prompt, budget)]
    shapes += [[n] * k for k, n in PACKED if k * n <= budget]
    for lengths in shapes:
        runs = [probe.prefill(lengths) for _ in range(repeats)]
        samples.append(StepSample(runs[0].shape, statistics.median(s.seconds for s in runs)))
    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            if batch <= probe.engine.config.max_num_seqs:
                samples.append(probe.decode(batch, context, decode_steps))
    return samples


def fit(samples: list[StepSample]) -> dict[str, float]:
    """Non-negative coefficients of the StepCosts model minimising the squared relative errors
    (a feature whose coefficient comes out negative is dropped and the rest refitted)."""
    if len(samples) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} timed steps to fit, got {len(samples)}")
    x = np.array([s.shape.features() for s in samples], dtype=np.float64)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    w = 1.0 / y
    active = list(range(len(FEATURES)))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        negative = [active[i] for i, c in enumerate(coef) if c < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda j: coef[active.index(j)]))
    out = dict.fromkeys(FEATURES, 0.0)
    out.update({FEATURES[j]: float(c) for j, c in zip(active, coef)})
    return out


def relative_errors(costs: StepCosts, samples: list[StepSample]) -> list[float]:
    """|predicted - measured| / measured of each sample under the fitted engine time."""
    return [abs(costs.engine_time(s.shape) - s.seconds) / s.seconds for s in samples]


def fit_step_costs(args: EngineArgs, max_prompt: int = 2048, repeats: int = 3,
                   source: dict | None = None) -> tuple[StepCosts, list[StepSample]]:
    """Measure and fit; the StepCosts carry the engine's limits and `source` (provenance)."""
    samples = measure(args, max_prompt, repeats)
    costs = StepCosts(fit(samples), args.max_num_batched_tokens, args.max_num_seqs,
                      source=dict(source or {}))
    errors = relative_errors(costs, samples)
    costs.source.update({"fit_steps": len(samples), "fit_median_rel_error": statistics.median(errors),
                         "fit_max_rel_error": max(errors)})
    return costs, samples
