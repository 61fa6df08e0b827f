"""Compare scenario 1: disaggregated (1 prefill + 1 decode) against colocated (2 workers), the
same processes and threads, the same requests and arrival times (new prompts at each rate, so the
prefix cache never serves one rate from another), at several request rates, on a mixed workload
(long prompts arriving while others decode). SLOs come from the colocated run at the reference
rate: its p90 TTFT and p90 TPOT, i.e. the service colocated gives 90% of requests."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pdserve.bench.serve import ServeSettings, run_serve
from pdserve.bench.serve_client import model_facts
from pdserve.bench.serve_datasets import DatasetSpec, build_requests, describe
from pdserve.bench.serve_metrics import RequestRecord, ServeMetrics, compute_metrics, run_duration
from pdserve.cli.cluster import LocalCluster

DEPLOYMENTS = {"colocated": {"prefill": 0, "decode": 0, "colocated": 2},
               "disaggregated": {"prefill": 1, "decode": 1, "colocated": 0}}
LABELS = {"colocated": "colocated (2 workers)", "disaggregated": "disaggregated (1 prefill + 1 decode)"}
SLO_PERCENTILE = 90
ITL_GOAL_RATIO = 0.5


@dataclass(frozen=True)
class DisaggSpec:
    """Scenario 1's inputs: served model, offered rates, the rate that sets the SLOs, workload."""

    model_dir: str
    rates: tuple[float, ...]
    reference_rate: float
    dataset: DatasetSpec
    threads_per_worker: int = 1
    warmup: int = 4

    def __post_init__(self) -> None:
        if not self.rates or min(self.rates) <= 0:
            raise ValueError(f"need request rates > 0, got {self.rates}")
        if self.reference_rate not in self.rates:
            raise ValueError(f"the reference rate {self.reference_rate} is not one of the rates {self.rates}")


@dataclass
class DisaggResult:
    """Records and figures per deployment and rate, the SLOs, and the goal's verdict."""

    records: dict[str, dict[float, list[RequestRecord]]]
    metrics: dict[str, dict[float, ServeMetrics]] = field(default_factory=dict)
    slos: dict[str, float] = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    goal: dict = field(default_factory=dict)


def run_deployment(name: str, spec: DisaggSpec) -> tuple[dict[float, list[RequestRecord]], dict]:
    """Start the deployment, run the workload at every rate (lowest first), stop it."""
    out: dict[float, list[RequestRecord]] = {}
    with LocalCluster(spec.model_dir, threads_per_worker=spec.threads_per_worker,
                      **DEPLOYMENTS[name]) as cluster:
        facts = model_facts(cluster.router_address)
        for i, rate in enumerate(sorted(spec.rates)):
            print(f"scenario 1: {LABELS[name]}, {rate:g} req/s", flush=True)
            # New prompts at each rate: the prefix cache must not serve a rate from an earlier one.
            dataset = replace(spec.dataset, seed=spec.dataset.seed + i)
            requests = build_requests(dataset, facts.vocab_size, facts.max_model_len)
            settings = ServeSettings(request_rate=rate, seed=dataset.seed, warmup=spec.warmup if i == 0 else 0)
            run = run_serve(cluster.router_address, requests, settings)
            if run.errors:
                raise RuntimeError(f"{name} at {rate} req/s: failed requests {run.errors}")
            out[rate] = run.records
            workload = describe(requests)
    return out, workload


def slos_from(records: list[RequestRecord]) -> dict[str, float]:
    """The colocated baseline's p90 TTFT and p90 TPOT (seconds)."""
    ttft = [r.ttft for r in records if r.success]
    tpot = [r.tpot for r in records if r.success and r.tpot is not None]
    return {"ttft": float(np.percentile(ttft, SLO_PERCENTILE)), "tpot": float(np.percentile(tpot, SLO_PERCENTILE))}


def goal_verdict(metrics: dict[str, dict[float, ServeMetrics]], rate: float) -> dict:
    """The issue's goal at the reference rate: ITL p99 at most half of colocated's, more goodput."""
    co, dis = metrics["colocated"][rate], metrics["disaggregated"][rate]
    itl_ratio = dis.itl["p99_ms"] / co.itl["p99_ms"] if co.itl["p99_ms"] else float("inf")
    return {"rate": rate, "itl_p99_ratio": itl_ratio, "itl_goal_met": itl_ratio <= ITL_GOAL_RATIO,
            "ttft_p99_ratio": dis.ttft["p99_ms"] / co.ttft["p99_ms"] if co.ttft["p99_ms"] else float("inf"),
            "goodput_colocated": co.goodput, "goodput_disaggregated": dis.goodput,
            "goodput_goal_met": dis.goodput > co.goodput}


def run_scenario(spec: DisaggSpec) -> DisaggResult:
    """Both deployments at every rate; SLOs from colocated at the reference rate; figures and goal."""
    result = DisaggResult(records={})
    for name in DEPLOYMENTS:
        result.records[name], result.workload = run_deployment(name, spec)
    result.slos = slos_from(result.records["colocated"][spec.reference_rate])
    result.metrics = {name: {rate: compute_metrics(recs, run_duration(recs), result.slos)
                             for rate, recs in by_rate.items()}
                      for name, by_rate in result.records.items()}
    result.goal = goal_verdict(result.metrics, spec.reference_rate)
    return result

