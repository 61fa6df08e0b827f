"""Measure the service path's overheads (simulate_costs.Overheads) on a running deployment: a few
requests one at a time (TTFT of a short and a long prompt, the first and later token gaps) and one
batch of concurrent requests (token gaps at batch size C), compared with the fitted engine costs;
then, optionally, refine the prefill scale and decode-step overhead on a measured run under load."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace

from pdserve.bench.serve import run_async
from pdserve.bench.serve_client import LoadSpec, model_facts, run_load
from pdserve.bench.serve_datasets import BenchRequest, DatasetSpec, build_requests
from pdserve.bench.serve_metrics import RequestRecord
from pdserve.bench.simulate import Deployment, simulate
from pdserve.bench.simulate_costs import Overheads, StepCosts, StepShape

SHORT_PROMPT, OUTPUT_LEN, CONCURRENT = 32, 24, 8
SKIP_GAPS = 3  # the first gaps of a request include its hand-off and admission


def _requests(address: str, prompt_len: int, output_len: int, count: int, seed: int) -> list[BenchRequest]:
    facts = model_facts(address)
    spec = DatasetSpec("random", count, prompt_len, output_len, seed=seed)
    return build_requests(spec, facts.vocab_size, facts.max_model_len)


def _run(address: str, requests: list[BenchRequest], concurrency: int | None) -> list[RequestRecord]:
    load = LoadSpec(offsets=(0.0,) * len(requests), max_concurrency=concurrency, progress=False)
    records = run_async(run_load(address, requests, load))
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"calibration request failed: {failed[0]}")
    return records


def _later_gaps(records: list[RequestRecord]) -> float:
    return statistics.median(g for r in records for g in r.itl[SKIP_GAPS:])


def calibrate(address: str, costs: StepCosts, long_prompt: int = 512, repeats: int = 4,
              seed: int = 1) -> Overheads:
    """Overheads of the deployment at `address` relative to `costs` (each clamped at >= 0; the
    prefill scale at >= 0.5). A warm-up request runs first and is not counted."""
    _run(address, _requests(address, 8, 4, 2, seed), 1)
    short = _run(address, _requests(address, SHORT_PROMPT, OUTPUT_LEN, repeats, seed), 1)
    long = _run(address, _requests(address, long_prompt, 4, repeats, seed + 1), 1)
    batch = _run(address, _requests(address, SHORT_PROMPT, OUTPUT_LEN, CONCURRENT, seed + 2), None)

    def engine_prefill(n: int) -> float:
        return costs.engine_time(StepShape(prompt_chunks=((n, 0),)))

    def engine_decode(b: int) -> float:
        return costs.engine_time(StepShape(decode_contexts=(SHORT_PROMPT + OUTPUT_LEN // 2,) * b))

    ttft_short = statistics.median(r.ttft for r in short)
    ttft_long = statistics.median(r.ttft for r in long)
    prefill_gain = engine_prefill(long_prompt) - engine_prefill(SHORT_PROMPT)
    scale = max(0.5, (ttft_long - ttft_short) / prefill_gain) if prefill_gain > 0 else 1.0
    request_s = max(0.0, ttft_short - scale * engine_prefill(SHORT_PROMPT))
    extra_1 = _later_gaps(short) - engine_decode(1)
    extra_c = _later_gaps(batch) - engine_decode(CONCURRENT)
    per_seq = max(0.0, (extra_c - extra_1) / (CONCURRENT - 1))
    step = max(0.0, extra_1 - per_seq)
    first_gap = statistics.median(r.itl[0] for r in short)
    handoff = max(0.0, first_gap - _later_gaps(short))
    return Overheads(request_s=request_s, handoff_s=handoff, decode_step_s=step, decode_per_seq_s=per_seq,
                     prefill_scale=scale)


def _median_of(records: list[RequestRecord], metric: str) -> float:
    values = [getattr(r, metric) for r in records if r.success and getattr(r, metric) is not None]
    if not values:
        raise ValueError(f"no {metric} values to calibrate on")
    return statistics.median(values)


def _solve(predict: Callable[[float], float], target: float, low: float, high: float, steps: int = 20) -> float:
    """x in [low, high] where the increasing function predict(x) meets target (bisection; an
    end of the interval when target lies outside)."""
    if predict(low) >= target:
        return low
    if predict(high) <= target:
        return high
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if predict(middle) < target else (low, middle)
    return (low + high) / 2


def refine_on_run(costs: StepCosts, lengths: list[tuple[int, int]], offsets: list[float], deployment: Deployment,
                  measured: list[RequestRecord], rounds: int = 2) -> Overheads:
    """Fit the request overhead, the prefill scale and the per-step decode overhead so that the
    simulated run of the same requests and arrivals has the measured median TTFT of its shorter
    and of its longer half of prompts, and the measured median TPOT (a run under load shows
    contention that requests sent one at a time do not)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i][0])
    short, long = order[: len(order) // 2], order[len(order) // 2:]

    def median(records: list[RequestRecord], metric: str, subset: list[int] | None = None) -> float:
        return _median_of([records[i] for i in subset] if subset is not None else records, metric)

    def predicted(o: Overheads, metric: str, subset: list[int] | None = None) -> float:
        return median(simulate(lengths, offsets, deployment, costs.with_overheads(o)), metric, subset)

    o = costs.overheads
    for _ in range(rounds if short else 0):
        o = replace(o, prefill_scale=_solve(lambda x: predicted(replace(o, prefill_scale=x), "ttft", long),
                                            median(measured, "ttft", long), 0.25, 8.0))
        o = replace(o, request_s=_solve(lambda x: predicted(replace(o, request_s=x), "ttft", short),
                                        median(measured, "ttft", short), 0.0, 1.0))
    return replace(o, decode_step_s=_solve(lambda x: predicted(replace(o, decode_step_s=x), "tpot"),
                                           median(measured, "tpot"), 0.0, 0.5))
