"""`pdserve bench serve`: build the workload for the router's model, run it, print the summary,
and save the figures when asked."""

from __future__ import annotations

import argparse
import shlex
import sys

from pdserve.bench.engine_bench_report import now_utc
from pdserve.bench.serve import run_async, run_serve, serve_run
from pdserve.bench.serve_client import model_facts
from pdserve.bench.serve_conversations import run_conversations
from pdserve.bench.serve_datasets import BenchRequest, build_requests, describe
from pdserve.bench.serve_flags import CONVERSATION, conversation_spec_from, dataset_spec_from, serve_settings_from
from pdserve.bench.serve_metrics import parse_slos
from pdserve.bench.serve_report import provenance, record_dicts, summary_lines, write_json
from pdserve.cli.flags import client_security_from


def run(ns: argparse.Namespace) -> int:
    """Run the benchmark against ns.router; 0 when every request succeeded, 1 otherwise."""
    if not ns.router:
        raise ValueError("--router HOST:PORT (or PDSERVE_ROUTER) is required")
    settings = serve_settings_from(ns)
    slos = parse_slos(ns.goodput)
    security = client_security_from(ns)  # TLS flags and --api-key
    facts = model_facts(ns.router, security=security)
    if ns.dataset_name == CONVERSATION:
        spec = conversation_spec_from(ns)
        print(f"pdserve bench serve: {spec.num_sessions} conversations of {spec.turns} turns to {ns.router} "
              f"({facts.model_name}), {settings.request_rate} sessions/s", flush=True)
        conversations = run_async(run_conversations(
            ns.router, spec, facts.vocab_size, facts.max_model_len, settings.request_rate, settings.burstiness,
            settings.temperature, settings.timeout_s, settings.progress, security))
        result = serve_run(conversations.records, slos)
        workload = describe_records(conversations.records)
    else:
        spec = dataset_spec_from(ns)
        requests = build_requests(spec, facts.vocab_size, facts.max_model_len)
        workload = describe(requests)
        print(f"pdserve bench serve: {workload['num_requests']} {spec.name} requests "
              f"(mean prompt {workload['mean_input_len']:.0f}, mean output {workload['mean_output_len']:.0f} "
              f"tokens) to {ns.router} ({facts.model_name}), rate {settings.request_rate} req/s, burstiness "
              f"{settings.burstiness}, max concurrency {settings.max_concurrency}", flush=True)
        result = run_serve(ns.router, requests, settings, slos, security)
    print("\n".join(summary_lines(result.metrics)))
    for error, count in result.errors.items():
        print(f"{count} request(s) failed: {error}", file=sys.stderr)
    if ns.save_result is not None:
        figures = {"command": "pdserve bench " + shlex.join(_redacted(sys.argv[2:])),
                   **provenance(), "router": ns.router, "model": facts.model_name,
                   "dataset": {**vars(spec), **workload}, "settings": settings.as_dict(),
                   "metrics": result.metrics.as_dict(), "errors": result.errors}
        if ns.save_detailed:
            figures["requests"] = record_dicts(result.records)
        path = ns.save_result or f"bench-serve-{now_utc().replace(':', '')}.json"
        print(f"saved {write_json(path, figures)}")
    return 0 if result.metrics.failed == 0 else 1


def describe_records(records) -> dict:
    """describe() of the requests a run sent (a conversation's prompts are known only once sent)."""
    return describe([BenchRequest((0,) * r.prompt_len, r.output_len) for r in records])


def _redacted(argv: list[str]) -> list[str]:
    """argv with the values of secret flags (--api-key) replaced by '***', for saved results."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
        hide = arg == "--api-key"
    return out
