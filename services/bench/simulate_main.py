"""`pdserve bench simulate`: get step costs (a saved profile, or a fit on this machine now,
optionally calibrated on a running deployment), simulate the workload on the chosen deployment,
print the predicted figures, and recommend a prefill:decode split when asked."""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
from pathlib import Path

from pdserve.bench.serve_arrivals import arrival_offsets
from pdserve.bench.serve_datasets import sample_lengths
from pdserve.bench.serve_flags import dataset_spec_from
from pdserve.bench.serve_metrics import compute_metrics, parse_slos, run_duration
from pdserve.bench.serve_report import provenance, summary_lines, write_json
from pdserve.bench.simulate import Deployment, simulate
from pdserve.bench.simulate_costs import StepCosts, load_costs, save_costs
from pdserve.bench.simulate_recommend import recommend, recommendation_lines


def obtain_costs(ns: argparse.Namespace) -> StepCosts:
    """The profile from --profile, or a fit now on --model / --size; then --calibrate-router."""
    if ns.profile:
        costs = load_costs(ns.profile)
    elif ns.model or ns.size:
        costs = _fit(ns)
    else:
        raise ValueError("give --profile FILE, or --model DIR / --size SIZE to fit the step costs now")
    if ns.calibrate_router:
        from pdserve.bench.simulate_calibrate import calibrate

        costs = costs.with_overheads(calibrate(ns.calibrate_router, costs))
        if ns.calibrate_rate:
            costs = costs.with_overheads(_refine(ns, costs))
        print(f"calibrated on {ns.calibrate_router}: {costs.overheads}", flush=True)
    elif ns.calibrate_rate:
        raise ValueError("--calibrate-rate needs --calibrate-router HOST:PORT")
    if ns.save_profile:
        print(f"saved step costs to {save_costs(costs, ns.save_profile)}")
    return costs


def _fit(ns: argparse.Namespace) -> StepCosts:
    from pdserve.bench.simulate_fit import fit_step_costs
    from pdserve.engine.setup import EngineArgs

    with tempfile.TemporaryDirectory(prefix="pdserve-fit-") as tmp:
        model = ns.model
        if not model:
            from pdserve.models.tiny_model import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "model", arch="llama", seed=0, size=ns.size))
        print(f"fitting step costs on {ns.model or 'make-tiny-model --size ' + ns.size} "
              f"({ns.device}, {ns.threads} thread(s))...", flush=True)
        args = EngineArgs(model=model, device=ns.device, threads=ns.threads, enable_prefix_caching=False)
        source = {**provenance(), "model": ns.model or f"make-tiny-model --size {ns.size}",
                  "device": ns.device, "threads": ns.threads}
        costs, _ = fit_step_costs(args, source=source)
    c = costs.coefficients
    print(f"fitted: base {c['base'] * 1e3:.3f} ms, {c['per_token'] * 1e6:.2f} us/token, "
          f"{c['per_prefill_pair'] * 1e9:.2f} ns/prefill pair, {c['per_decode_ctx'] * 1e9:.2f} ns/decode "
          f"context token, {c['per_seq'] * 1e6:.1f} us/sequence (median relative error "
          f"{100 * costs.source['fit_median_rel_error']:.1f}%)", flush=True)
    return costs


def _refine(ns: argparse.Namespace, costs: StepCosts):
    """Run the workload's distribution (seed + 1) at --calibrate-rate on the router and refine."""
    from dataclasses import replace

    from pdserve.bench.serve import ServeSettings, run_serve
    from pdserve.bench.serve_client import model_facts
    from pdserve.bench.serve_datasets import build_requests
    from pdserve.bench.simulate_calibrate import refine_on_run

    spec = replace(dataset_spec_from(ns), seed=ns.seed + 1)
    facts = model_facts(ns.calibrate_router)
    requests = build_requests(spec, facts.vocab_size, facts.max_model_len)
    print(f"calibration run: {len(requests)} requests at {ns.calibrate_rate} req/s on {ns.calibrate_router}",
          flush=True)
    settings = ServeSettings(request_rate=ns.calibrate_rate, seed=spec.seed, warmup=2, progress=False)
    measured = run_serve(ns.calibrate_router, requests, settings).records
    offsets = arrival_offsets(len(requests), ns.calibrate_rate, 1.0, spec.seed)
    return refine_on_run(costs, [(r.prompt_len, r.output_len) for r in requests], offsets, _deployment(ns), measured)


def _deployment(ns: argparse.Namespace) -> Deployment:
    if ns.colocated:
        return Deployment(0, 0, ns.colocated)
    return Deployment(ns.prefill, ns.decode)


def workload(ns: argparse.Namespace) -> tuple[list[tuple[int, int]], list[float]]:
    """(prompt_len, output_len) pairs and arrival offsets, as `bench serve` would draw them."""
    if ns.max_concurrency:
        raise ValueError("simulate models open-loop arrivals (--request-rate); --max-concurrency is not supported")
    spec = dataset_spec_from(ns)
    lengths = sample_lengths(spec, random.Random(spec.seed))
    return lengths, arrival_offsets(len(lengths), ns.request_rate, ns.burstiness, ns.seed)


def run(ns: argparse.Namespace) -> int:
    """Predict, print, optionally recommend and save; returns 0."""
    slos = parse_slos(ns.goodput)
    deployment = _deployment(ns)
    lengths, offsets = workload(ns)
    costs = obtain_costs(ns)
    records = simulate(lengths, offsets, deployment, costs)
    metrics = compute_metrics(records, run_duration(records), slos)
    print("\n".join(summary_lines(metrics, f"Simulated: {deployment.label}")))
    figures = {"command": "pdserve bench " + shlex.join(sys.argv[2:]), **provenance(),
               "deployment": deployment.label, "costs": costs.as_dict(), "dataset": vars(dataset_spec_from(ns)),
               "request_rate": str(ns.request_rate), "burstiness": ns.burstiness, "metrics": metrics.as_dict()}
    if ns.recommend:
        rec = recommend(lengths, offsets, costs, slos, ns.max_servers, ns.attainment)
        print("\n".join(recommendation_lines(rec)))
        figures["candidates"] = [c.as_row() for c in rec.candidates]
        figures["recommended"] = rec.best.as_row() if rec.best else None
    if ns.save_result:
        print(f"saved {write_json(ns.save_result, figures)}")
    return 0
