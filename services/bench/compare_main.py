"""`pdserve bench compare`: the four comparisons in one run on this machine, written to --out
as report.json, report.md and PNG plots."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from pdserve.bench.compare_disagg import DisaggSpec, run_scenario
from pdserve.bench.compare_engine import run_engine_bench, run_kv_waste
from pdserve.bench.compare_plots import engine_bars, latency_cdfs, throughput_vs_rate
from pdserve.bench.compare_report import disagg_json, markdown
from pdserve.bench.serve_datasets import DatasetSpec
from pdserve.bench.serve_report import provenance, write_json

SCENARIOS = {"1", "2", "3", "4"}


def parse_rates(text: str) -> tuple[float, ...]:
    """'1,2,3' -> (1.0, 2.0, 3.0), each > 0."""
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--rates takes numbers separated by commas, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise ValueError(f"--rates needs at least one rate > 0, got {text!r}")
    return rates


def mixed_workload(num_prompts: int, seed: int) -> DatasetSpec:
    """Scenario 1's workload: chat-like requests (prompt 192..320, output 48..80 tokens) and 20% long
    prompts (1024 tokens, 8 output tokens) that arrive while the others decode."""
    return DatasetSpec(name="mixed", num_prompts=num_prompts, input_len=256, output_len=64, range_ratio=0.25,
                       long_prompt_len=1024, long_output_len=8, long_fraction=0.2, seed=seed)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run(ns: argparse.Namespace) -> int:
    """Run the chosen scenarios, then write the report; returns 0."""
    only = {s.strip() for s in ns.only.split(",") if s.strip()}
    if not only or not only <= SCENARIOS:
        raise ValueError(f"--only takes scenarios from 1,2,3,4; got {ns.only!r}")
    rates = parse_rates(ns.rates)
    reference = ns.reference_rate if ns.reference_rate is not None else sorted(rates)[len(rates) // 2]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), _load()
    figures: dict = {"command": "pdserve bench " + shlex.join(sys.argv[2:])}
    disagg, spec_text = None, ""
    with tempfile.TemporaryDirectory(prefix="pdserve-compare-") as tmp:
        if "1" in only:
            model_dir = ns.model_dir or _make_model(Path(tmp) / "model", ns.size)
            spec = DisaggSpec(model_dir, rates, reference, mixed_workload(ns.num_prompts, ns.seed))
            disagg = run_scenario(spec)
            figures["disaggregation"] = disagg_json(disagg)
            spec_text = (f"Model: {ns.model_dir or 'make-tiny-model --size ' + ns.size} (fp32, CPU), one torch "
                         f"thread per worker process; router, embedded Redis and the load generator on the "
                         f"same machine.")
            latency_cdfs(disagg, reference, out / "latency_cdf.png")
            throughput_vs_rate(disagg, out / "throughput_vs_rate.png")
    if only & {"2", "3"}:
        figures["engine"] = run_engine_bench(ns.engine_size, ns.engine_requests, ns.seed)
    if "4" in only:
        figures["kv_waste"] = run_kv_waste(ns.engine_requests, ns.seed)
    if only & {"2", "3", "4"}:
        engine_bars(figures.get("engine"), figures.get("kv_waste"), out / "engine.png")
    figures["runtime_s"] = time.perf_counter() - started
    figures["provenance"] = {**provenance(), "load_1min_before": load_before, "load_1min_after": _load()}
    write_json(out / "report.json", figures)
    (out / "report.md").write_text(markdown(figures, disagg, spec_text), encoding="utf-8")
    print(f"compare report written to {out}/report.md (report.json, PNG plots)")
    return 0


def _make_model(path: Path, size: str) -> str:
    from pdserve.models.tiny_model import make_tiny_model

    return str(make_tiny_model(path, arch="llama", seed=0, size=size))
