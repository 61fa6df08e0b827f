"""`pdserve bench routing`: --routing kv against --routing load on the same cluster shape (2 prefill + 2
decode servers by default), the same workloads, rates and seeds, in one run.

Two workloads per policy, each on a fresh cluster (empty caches):
  conversation  multi-turn sessions sharing a system prompt (pdserve.bench.serve_conversations): what
                KV-aware routing is for. Reported: prefill tokens computed (the prefill servers'
                pdserve:prefill_tokens_computed_total), KV bytes received by the decode servers, KV
                blocks kept from a decode server's cache, TTFT p50/p99 and goodput under SLOs taken
                from the load-routed run (its p90 TTFT and TPOT), and whether every greedy answer is
                the same token for token.
  random        prompts that share nothing: kv routing must cost nothing here. Reported: throughput
                and each server's share of the requests.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pdserve.bench.serve import ServeSettings, run_async, run_serve, warmup_requests
from pdserve.bench.serve_client import model_facts
from pdserve.bench.serve_conversations import ConversationSpec, run_conversations
from pdserve.bench.serve_datasets import DatasetSpec, build_requests
from pdserve.bench.serve_flags import add_conversation_flags, conversation_spec_from
from pdserve.bench.serve_metrics import RequestRecord, compute_metrics, run_duration
from pdserve.bench.serve_report import provenance, write_json
from pdserve.cli.cluster import LocalCluster, ServerProcess
from pdserve.telemetry.scrape import scrape_metrics

POLICIES = ("load", "kv")
# Server counters read before and after each workload (summed over a role's servers, and per server).
COUNTERS = {
    "prefill_tokens_computed": ("prefill", "pdserve:prefill_tokens_computed_total"),
    "prefill_requests": ("prefill", "pdserve:engine_requests_finished_total"),
    "decode_requests": ("decode", "pdserve:engine_requests_finished_total"),
    "kv_blocks_held": ("decode", "pdserve:kv_reserved_blocks_total{source=held}"),
    "kv_blocks_transferred": ("decode", "pdserve:kv_reserved_blocks_total{source=transferred}"),
}
KV_BYTES_PREFIX = "pdserve:kv_transfer_bytes_total{data_path="  # received, summed over data paths
TARGETS = {"prefill_tokens_ratio": 3.0, "kv_bytes_ratio": 2.0, "ttft_p50_ratio": 2.0}
THROUGHPUT_TOLERANCE = 0.05
MAX_SERVER_SHARE = 0.75
SLO_PERCENTILE = 90


@dataclass(frozen=True)
class RoutingSpec:
    """The comparison's inputs."""

    model_dir: str
    conversation: ConversationSpec
    session_rate: float
    random: DatasetSpec
    random_rate: float
    prefill: int = 2
    decode: int = 2
    threads_per_worker: int = 1
    extra_args: tuple[str, ...] = ()  # every server's flags
    kv_cache_mb: dict[str, int] = field(default_factory=dict)  # role -> its servers' KV cache (MiB)


@dataclass
class WorkloadRun:
    """One workload under one policy: request records, answers (conversation) and server counters."""

    records: list[RequestRecord]
    answers: list[list[int]] = field(default_factory=list)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> worker id -> delta


def read_counters(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    """COUNTERS, KV bytes received, CPU seconds of every process and the router's decisions by role and
    reason, now, as name -> worker id (or "role/reason") -> value."""
    out: dict[str, dict[str, float]] = {name: {} for name in [*COUNTERS, "kv_bytes_received", "cpu_seconds",
                                                               "routing_decisions"]}
    for proc in cluster.servers("router"):
        samples = scrape_metrics(proc.metrics_address)
        out["cpu_seconds"]["router"] = samples.get("process_cpu_seconds_total", 0.0)
        for key, value in samples.items():
            if key.startswith("pdserve:router_routing_decisions_total{"):
                labels = dict(item.split("=", 1) for item in key[key.index("{") + 1:-1].split(","))
                out["routing_decisions"][f"{labels['role']}/{labels['reason']}"] = value
    for role in ("prefill", "decode"):
        for proc in cluster.servers(role):
            samples = scrape_metrics(proc.metrics_address)
            worker = _worker_id(proc)
            out["cpu_seconds"][worker] = samples.get("process_cpu_seconds_total", 0.0)
            for name, (counter_role, key) in COUNTERS.items():
                if counter_role == role:
                    out[name][worker] = samples.get(key, 0.0)
            if role == "decode":
                out["kv_bytes_received"][worker] = sum(
                    v for k, v in samples.items() if k.startswith(KV_BYTES_PREFIX) and "direction=received" in k)
    return out


def _worker_id(proc: ServerProcess) -> str:
    return proc.log_path.stem  # LocalCluster names a server's log after its worker id


def _delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {name: {w: after[name][w] - before[name].get(w, 0.0) for w in after[name]} for name in after}


def run_policy(policy: str, spec: RoutingSpec) -> dict[str, WorkloadRun]:
    """Both workloads under one routing policy, each on a fresh cluster."""
    args = ["--routing", policy, *spec.extra_args]
    shape = dict(prefill=spec.prefill, decode=spec.decode, threads_per_worker=spec.threads_per_worker,
                 role_env={role: {"PDSERVE_KV_CACHE_MB": str(mb)} for role, mb in spec.kv_cache_mb.items()})
    runs = {}
    with LocalCluster(spec.model_dir, extra_args=args, **shape) as cluster:
        facts = model_facts(cluster.router_address)
        print(f"routing {policy}: conversation workload", flush=True)
        before = read_counters(cluster)
        result = run_async(run_conversations(cluster.router_address, spec.conversation, facts.vocab_size,
                                             facts.max_model_len, spec.session_rate, progress=False))
        runs["conversation"] = WorkloadRun(result.records, result.answers, _delta(read_counters(cluster), before))
    with LocalCluster(spec.model_dir, extra_args=args, **shape) as cluster:
        print(f"routing {policy}: random workload (no shared prefixes)", flush=True)
        requests = build_requests(spec.random, facts.vocab_size, facts.max_model_len)
        run_serve(cluster.router_address, warmup_requests(requests, 2), ServeSettings(progress=False))  # not counted
        before = read_counters(cluster)
        run = run_serve(cluster.router_address, requests,
                        ServeSettings(request_rate=spec.random_rate, seed=spec.random.seed, progress=False))
        runs["random"] = WorkloadRun(run.records, counters=_delta(read_counters(cluster), before))
    return runs


def slos_from(records: list[RequestRecord]) -> dict[str, float]:
    """The load-routed run's p90 TTFT and TPOT (seconds): the service load routing gives 90% of requests."""
    ttft = [r.ttft for r in records if r.success]
    tpot = [r.tpot for r in records if r.success and r.tpot is not None]
    return {"ttft": float(np.percentile(ttft, SLO_PERCENTILE)), "tpot": float(np.percentile(tpot, SLO_PERCENTILE))}


def report(runs: dict[str, dict[str, WorkloadRun]]) -> dict:
    """The figures per policy and workload, the kv/load ratios, and each target's verdict."""
    slos = slos_from(runs["load"]["conversation"].records)
    figures: dict = {"slos_ms": {k: v * 1000 for k, v in slos.items()}, "policies": {}}
    for policy, by_workload in runs.items():
        entry = {}
        for workload, run in by_workload.items():
            metrics = compute_metrics(run.records, run_duration(run.records), slos)
            totals = {name: sum(per_worker.values()) for name, per_worker in run.counters.items()}
            requests = run.counters["decode_requests"]
            shares = {role: _shares(run.counters[f"{role}_requests"]) for role in ("prefill", "decode")}
            entry[workload] = {"metrics": metrics.as_dict(), "totals": totals, "per_worker": run.counters,
                               "server_shares": shares, "requests": sum(requests.values())}
        figures["policies"][policy] = entry
    figures["verdict"] = verdict(runs, figures)
    return figures


def _shares(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {w: (c / total if total else 0.0) for w, c in sorted(counts.items())}


def compare_answers(load: WorkloadRun, kv: WorkloadRun) -> tuple[int, int]:
    """(requests answered under both policies, how many of those answers differ). A request that failed
    under either policy (a cluster at its KV limit refuses a reservation) has no answer to compare, and
    neither have its session's later turns; the failures are reported on their own."""
    both = [(a, b) for a, b, ra, rb in zip(load.answers, kv.answers, load.records, kv.records)
            if ra.success and rb.success]
    return len(both), sum(a != b for a, b in both)


def verdict(runs: dict[str, dict[str, WorkloadRun]], figures: dict) -> dict:
    """Ratios load/kv (how many times fewer or lower with kv) and whether each target holds."""
    load, kv = figures["policies"]["load"]["conversation"], figures["policies"]["kv"]["conversation"]

    def ratio(a: float, b: float) -> float:  # nothing measured on either side (a missing counter) fails
        return a / b if b else float("inf") if a else float("nan")

    lm, km = load["metrics"], kv["metrics"]
    compared, differing = compare_answers(runs["load"]["conversation"], runs["kv"]["conversation"])
    out = {
        "same_greedy_answers": compared > 0 and differing == 0,
        "compared_answers": compared,
        "differing_answers": differing,
        "failed_load": lm["failed"], "failed_kv": km["failed"],
        "prefill_tokens_ratio": ratio(load["totals"]["prefill_tokens_computed"], kv["totals"]["prefill_tokens_computed"]),
        "kv_bytes_ratio": ratio(load["totals"]["kv_bytes_received"], kv["totals"]["kv_bytes_received"]),
        "ttft_p50_ratio": ratio(lm["ttft"]["p50_ms"], km["ttft"]["p50_ms"]),
        "ttft_p99_kv_over_load": ratio(km["ttft"]["p99_ms"], lm["ttft"]["p99_ms"]),
        "goodput_load": lm["goodput"], "goodput_kv": km["goodput"],
    }
    for name, target in TARGETS.items():
        out[f"{name}_met"] = out[name] >= target
    out["ttft_p99_met"] = out["ttft_p99_kv_over_load"] <= 1.0
    out["goodput_met"] = km["goodput"] >= lm["goodput"]
    rl, rk = figures["policies"]["load"]["random"], figures["policies"]["kv"]["random"]
    out["random_throughput_kv_over_load"] = ratio(rk["metrics"]["request_throughput"],
                                                  rl["metrics"]["request_throughput"])
    out["random_throughput_met"] = out["random_throughput_kv_over_load"] >= 1 - THROUGHPUT_TOLERANCE
    out["random_max_server_share_kv"] = max(share for shares in rk["server_shares"].values()
                                            for share in shares.values())
    out["random_share_met"] = 0 < out["random_max_server_share_kv"] <= MAX_SERVER_SHARE  # 0: nothing counted
    return out


def markdown(figures: dict, command: str) -> str:
    """The report as a Markdown table (for services/bench/RESULTS.md)."""
    v = figures["verdict"]
    rows = ["| conversation workload | load | kv | load/kv | target |", "|---|---|---|---|---|"]
    load, kv = figures["policies"]["load"]["conversation"], figures["policies"]["kv"]["conversation"]
    for label, key, target in (("prefill tokens computed", "prefill_tokens_computed", "prefill_tokens_ratio"),
                               ("KV bytes received", "kv_bytes_received", "kv_bytes_ratio")):
        rows.append(f"| {label} | {load['totals'][key]:.0f} | {kv['totals'][key]:.0f} | {v[target]:.2f}x | "
                    f">= {TARGETS[target]:g}x {'met' if v[target + '_met'] else 'MISSED'} |")
    rows.append(f"| KV blocks kept from the decode cache | {load['totals']['kv_blocks_held']:.0f} | "
                f"{kv['totals']['kv_blocks_held']:.0f} | | |")
    for p in ("p50", "p99"):
        lv, kvv = load["metrics"]["ttft"][f"{p}_ms"], kv["metrics"]["ttft"][f"{p}_ms"]
        goal = (f">= 2x {'met' if v['ttft_p50_ratio_met'] else 'MISSED'}" if p == "p50"
                else f"no worse {'met' if v['ttft_p99_met'] else 'MISSED'}")
        rows.append(f"| TTFT {p} (ms) | {lv:.1f} | {kvv:.1f} | {lv / kvv if kvv else float('inf'):.2f}x | {goal} |")
    rows.append(f"| goodput (req/s, SLOs {figures['slos_ms']['ttft']:.0f} ms TTFT, "
                f"{figures['slos_ms']['tpot']:.0f} ms TPOT) | {v['goodput_load']:.2f} | {v['goodput_kv']:.2f} | | "
                f"no worse {'met' if v['goodput_met'] else 'MISSED'} |")
    rows.append(f"| requests failed | {v['failed_load']} | {v['failed_kv']} | | |")
    rows.append(f"| greedy answers identical (requests answered under both) | | | | "
                f"{'yes' if v['same_greedy_answers'] else 'NO'} ({v['differing_answers']} of "
                f"{v['compared_answers']} differ) |")
    rl, rk = figures["policies"]["load"]["random"], figures["policies"]["kv"]["random"]
    rows += ["", "| random workload (no shared prefix) | load | kv | kv/load | target |", "|---|---|---|---|---|",
             f"| request throughput (req/s) | {rl['metrics']['request_throughput']:.3f} | "
             f"{rk['metrics']['request_throughput']:.3f} | {v['random_throughput_kv_over_load']:.3f} | "
             f">= 0.95 {'met' if v['random_throughput_met'] else 'MISSED'} |",
             f"| largest share of requests on one server | "
             f"{max(s for shares in rl['server_shares'].values() for s in shares.values()):.2f} | "
             f"{v['random_max_server_share_kv']:.2f} | | <= 0.75 {'met' if v['random_share_met'] else 'MISSED'} |"]
    return f"`{command}`\n\n" + "\n".join(rows) + "\n"


def add_flags(p: argparse.ArgumentParser) -> None:
    """The subcommand's flags."""
    p.add_argument("--out", default="bench-routing", help="report folder (report.json, report.md)")
    p.add_argument("--size", default="small", help="make-tiny-model size of the served model")
    p.add_argument("--train-steps", type=int, default=300,
                   help="train the made model this many steps (~50 s for small): greedy answers are compared "
                        "across runs whose prefix-cache hits differ, and fp32 rounding differs with them; a "
                        "trained model's margins keep such a comparison about routing, not near-ties")
    p.add_argument("--model-dir", default=None, help="serve this checkpoint instead of making one")
    add_conversation_flags(p)
    p.set_defaults(conversation_sessions=32, conversation_turns=8, conversation_first_message_len=768,
                   conversation_think_time_s=3.0)
    p.add_argument("--session-rate", type=float, default=2.0, help="sessions started per second (Poisson)")
    p.add_argument("--random-prompts", type=int, default=48, help="requests of the random workload")
    p.add_argument("--random-input-len", type=int, default=512)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--random-rate", type=float, default=2.0, help="requests per second of the random workload")
    p.add_argument("--kv-transfer", default="tcp", choices=("tcp", "nixl", "auto"), help="the servers' KV data path")
    p.add_argument("--prefill-kv-cache-mb", type=int, default=32,
                   help="each prefill server's KV cache (its prefix cache): by default ~16k tokens of the small "
                        "model, against ~40k tokens of conversations open at once: the half of them routed to "
                        "it mostly fits, every conversation does not")
    p.add_argument("--decode-kv-cache-mb", type=int, default=32,
                   help="each decode server's KV cache: it also holds every running and reserved sequence (a "
                        "decode server that cannot reserve a prompt's blocks refuses the request: at 24 MiB "
                        "load routing's did)")
    p.add_argument("--seed", type=int, default=0)


def run(ns: argparse.Namespace) -> int:
    """Run both policies, write report.json and report.md into ns.out, print the table; 0 when every
    target holds."""
    from pdserve.models.tiny_model import make_tiny_model

    out = Path(ns.out)
    model_dir = ns.model_dir or str(make_tiny_model(Path(tempfile.mkdtemp(prefix="pdserve-routing-")) / "model",
                                                    size=ns.size, seed=ns.seed, train_steps=ns.train_steps))
    conversation = conversation_spec_from(ns)
    random_spec = DatasetSpec(name="random", num_prompts=ns.random_prompts, input_len=ns.random_input_len,
                              output_len=ns.random_output_len, seed=ns.seed + 1)
    spec = RoutingSpec(model_dir, conversation, ns.session_rate, random_spec, ns.random_rate,
                       extra_args=("--kv-transfer", ns.kv_transfer),
                       kv_cache_mb={"prefill": ns.prefill_kv_cache_mb, "decode": ns.decode_kv_cache_mb})
    runs = {policy: run_policy(policy, spec) for policy in POLICIES}
    figures = report(runs)
    command = "pdserve bench " + shlex.join(sys.argv[2:])
    made = f"make-tiny-model {ns.size} seed {ns.seed} trained {ns.train_steps} steps"
    figures.update({"command": command, **provenance(), "spec": json.loads(json.dumps(asdict(replace(
        spec, model_dir=ns.model_dir or made)), default=str))})
    write_json(out / "report.json", figures)
    text = markdown(figures, command)
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    met = [value for key, value in figures["verdict"].items() if key.endswith("_met")]
    return 0 if all(met) and figures["verdict"]["same_greedy_answers"] else 1
