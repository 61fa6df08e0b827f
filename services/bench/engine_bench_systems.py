"""The four systems of the engine benchmark, each run over the same Workload.

(a) the pdserve engine (continuous batching), (d) the same engine forced to static batches,
(b) Hugging Face `generate` one request at a time, (c) `generate` in static batches.
Only the tokens a request asked for count as output tokens; a static batch runs until its
longest member is done, which is the work static batching wastes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.bench.engine_bench_kv import KVWasteMeter
from pdserve.bench.engine_bench_workload import Workload
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.models.sampling_params import SamplingParams


@dataclass
class SystemResult:
    """One system's run: output tokens it produced, wall seconds, and the tokens per request.

    outputs: request index -> generated token ids (only the requests it ran);
    estimated: seconds (and so tokens/s) extrapolated from a subset, explained in note.
    """

    name: str
    output_tokens: int
    seconds: float
    outputs: dict[int, list[int]] = field(default_factory=dict)
    estimated: bool = False
    note: str = ""
    kv_waste: KVWasteMeter | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per wall-clock second."""
        return self.output_tokens / self.seconds if self.seconds > 0 else float("inf")


def greedy_params(max_tokens: int) -> SamplingParams:
    """Greedy decoding of exactly max_tokens tokens (EOS does not stop it)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_pdserve(name: str, runner: Any, tokenizer: Any, workload: Workload,
                static_batch_size: int | None) -> SystemResult:
    """Submit the whole workload at once to a fresh LLMEngine on `runner` and step it dry.

    KV waste is sampled after every step; the sampling time is not counted in `seconds`.
    """
    config = EngineConfig(block_size=runner.block_size, num_blocks=runner.num_blocks,
                          static_batch_size=static_batch_size)
    engine = LLMEngine(runner, tokenizer, config)
    meter = KVWasteMeter()
    outputs: dict[int, list[int]] = {i: [] for i in range(workload.num_requests)}
    start = time.perf_counter()
    for i, (prompt, length) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(str(i), prompt, greedy_params(length))
    elapsed = time.perf_counter() - start
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        step_outputs = engine.step()
        elapsed += time.perf_counter() - t0
        for out in step_outputs:
            outputs[int(out.request_id)].extend(out.samples[0].token_ids)
        meter.sample(engine)
    counters = engine.stats().counters
    return SystemResult(name, sum(len(t) for t in outputs.values()), elapsed, outputs, kv_waste=meter,
                        extra={"steps": counters.num_steps, "preemptions": counters.num_preemptions,
                               "cache_hit_tokens": counters.num_cache_hit_tokens})


def hf_generate(model: Any, prompts: list[tuple[int, ...]], max_new_tokens: int) -> torch.Tensor:
    """Greedy `generate` of a batch of equal-length prompts; returns the new tokens [B, max_new]."""
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    new = out[:, ids.shape[1]:]
    if new.shape[1] != max_new_tokens:
        raise RuntimeError(f"transformers generate stopped after {new.shape[1]} of {max_new_tokens} tokens")
    return new


def run_hf_single(model: Any, workload: Workload, indices: list[int]) -> SystemResult:
    """(b) `generate` one request at a time, each with its own length, over `indices`.

    When indices is a subset, the full workload's time is estimated from a least-squares fit
    seconds = a + b * output_len over the measured requests (see SystemResult.note).
    """
    outputs: dict[int, list[int]] = {}
    times: list[float] = []
    for i in indices:
        t0 = time.perf_counter()
        new = hf_generate(model, [workload.prompts[i]], workload.output_lens[i])
        times.append(time.perf_counter() - t0)
        outputs[i] = new[0].tolist()
    measured_tokens = sum(workload.output_lens[i] for i in indices)
    result = SystemResult("(b) transformers generate, one at a time", measured_tokens, sum(times), outputs)
    if len(indices) < workload.num_requests:
        a, b = _fit_line([workload.output_lens[i] for i in indices], times)
        estimate = sum(a + b * length for length in workload.output_lens)
        result.extra = {"measured_requests": len(indices), "measured_tokens": measured_tokens,
                        "measured_seconds": sum(times), "fit_a_s": a, "fit_b_s_per_token": b}
        result.note = (f"ESTIMATED: measured {len(indices)} of {workload.num_requests} requests "
                       f"({measured_tokens} tokens in {sum(times):.1f} s, "
                       f"{measured_tokens / sum(times):.2f} tok/s); full-workload seconds from the fit "
                       f"t = {a:.3f} s + {b * 1000:.2f} ms * output_len per request")
        result.output_tokens, result.seconds, result.estimated = workload.total_output_tokens, estimate, True
    return result


def run_hf_static(model: Any, workload: Workload, batch_size: int) -> SystemResult:
    """(c) `generate` in static batches of batch_size requests in workload order; each batch runs to
    its longest member's length, and only each request's own length counts as output."""
    outputs: dict[int, list[int]] = {}
    elapsed = 0.0
    generated = 0  # tokens generate() produced, the discarded ones past a request's length included
    for first in range(0, workload.num_requests, batch_size):
        batch = list(range(first, min(first + batch_size, workload.num_requests)))
        longest = max(workload.output_lens[i] for i in batch)
        t0 = time.perf_counter()
        new = hf_generate(model, [workload.prompts[i] for i in batch], longest)
        elapsed += time.perf_counter() - t0
        generated += longest * len(batch)
        for row, i in enumerate(batch):
            outputs[i] = new[row, :workload.output_lens[i]].tolist()
    return SystemResult(f"(c) transformers generate, static batches of {batch_size}",
                        sum(len(t) for t in outputs.values()), elapsed, outputs,
                        extra={"generated_incl_discarded": generated})


def _fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b * x; a flat fit through the mean when x does not vary."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if var_x == 0:
        return 0.0, mean_y / mean_x
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x
    return mean_y - b * mean_x, b
