"""Size a deployment with the simulator: for a workload at a target rate and SLOs, find the fewest
servers (and their prefill:decode split) whose predicted SLO attainment reaches the goal,
with colocated workers of the same count alongside for comparison."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bench.serve_metrics import ServeMetrics, compute_metrics, run_duration
from pdserve.bench.simulate import Deployment, simulate
from pdserve.bench.simulate_costs import StepCosts


@dataclass
class Candidate:
    """One deployment's predicted figures."""

    deployment: Deployment
    metrics: ServeMetrics

    def as_row(self) -> dict:
        """Plain figures for tables and JSON."""
        d, m = self.deployment, self.metrics
        servers = d.prefill + d.decode + d.colocated
        return {"deployment": d.label, "prefill": d.prefill, "decode": d.decode, "colocated": d.colocated,
                "slo_attainment": m.slo_attainment, "goodput": m.goodput, "goodput_per_server": m.goodput / servers,
                "ttft_p90_ms": m.ttft["p90_ms"], "tpot_p90_ms": m.tpot["p90_ms"], "itl_p99_ms": m.itl["p99_ms"]}


@dataclass
class Recommendation:
    """Every candidate tried, and the chosen disaggregated one (None if none met the goal)."""

    candidates: list[Candidate]
    best: Candidate | None
    attainment_goal: float


def evaluate(lengths: list[tuple[int, int]], offsets: list[float], deployment: Deployment,
             costs: StepCosts, slos: dict[str, float]) -> Candidate:
    """Simulate one deployment and score it against the SLOs (seconds)."""
    records = simulate(lengths, offsets, deployment, costs)
    return Candidate(deployment, compute_metrics(records, run_duration(records), slos))


def recommend(lengths: list[tuple[int, int]], offsets: list[float], costs: StepCosts,
              slos: dict[str, float], max_servers: int = 8, attainment: float = 0.9) -> Recommendation:
    """Try every split of 2, 3, ... max_servers servers; the answer is the smallest total with a
    split reaching `attainment`, and among those the split with the highest attainment (then
    goodput). Colocated workers of each total are evaluated too, for comparison only."""
    if not slos:
        raise ValueError("recommend needs SLOs: give --goodput ttft:MS tpot:MS")
    if max_servers < 2:
        raise ValueError(f"max_servers must be >= 2 (one prefill + one decode), got {max_servers}")
    if not 0.0 < attainment <= 1.0:
        raise ValueError(f"attainment goal must be in (0, 1], got {attainment}")
    candidates: list[Candidate] = []
    best = None
    for total in range(2, max_servers + 1):
        split = [evaluate(lengths, offsets, Deployment(p, total - p), costs, slos) for p in range(1, total)]
        candidates += split
        candidates.append(evaluate(lengths, offsets, Deployment(0, 0, total), costs, slos))
        meeting = [c for c in split if c.metrics.slo_attainment >= attainment]
        if meeting:
            best = max(meeting, key=lambda c: (c.metrics.slo_attainment, c.metrics.goodput))
            break
    return Recommendation(candidates, best, attainment)


def recommendation_lines(rec: Recommendation) -> list[str]:
    """A table of the candidates and one line with the answer."""
    lines = [f"{'deployment':<14}{'SLO att.':>9}{'goodput':>9}{'/server':>9}{'TTFT p90':>10}{'TPOT p90':>10}"
             f"{'ITL p99':>9}"]
    for c in rec.candidates:
        r = c.as_row()
        lines.append(f"{r['deployment']:<14}{100 * r['slo_attainment']:>8.1f}%{r['goodput']:>9.2f}"
                     f"{r['goodput_per_server']:>9.2f}{r['ttft_p90_ms']:>10.1f}{r['tpot_p90_ms']:>10.1f}"
                     f"{r['itl_p99_ms']:>9.1f}")
    if rec.best is None:
        lines.append(f"no split of up to {rec.candidates[-1].deployment.colocated} servers reaches "
                     f"{100 * rec.attainment_goal:.0f}% SLO attainment")
    else:
        d = rec.best.deployment
        lines.append(f"recommended: {d.prefill} prefill : {d.decode} decode ({d.label}), predicted SLO "
                     f"attainment {100 * rec.best.metrics.slo_attainment:.1f}% "
                     f"(goal {100 * rec.attainment_goal:.0f}%), goodput {rec.best.metrics.goodput:.2f} req/s")
    return lines
