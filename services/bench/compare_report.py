"""The compare report: one JSON of every figure and a Markdown page that shows them with the
plots, the goals' verdicts, and where the figures come from."""

from __future__ import annotations

from pdserve.bench.compare_disagg import LABELS, SLO_PERCENTILE, DisaggResult
from pdserve.bench.serve_metrics import ServeMetrics


def disagg_json(result: DisaggResult) -> dict:
    """Scenario 1's figures (per deployment and rate), SLOs and goal, JSON-ready."""
    return {"workload": result.workload, "slos_ms": {k: v * 1e3 for k, v in result.slos.items()},
            "goal": result.goal,
            "runs": {name: {str(rate): m.as_dict() for rate, m in by_rate.items()}
                     for name, by_rate in result.metrics.items()}}


def _row(name: str, rate: float, m: ServeMetrics) -> str:
    return (f"| {LABELS[name]} | {rate:g} | {m.request_throughput:.2f} | {m.output_throughput:.1f} | "
            f"{m.ttft['p50_ms']:.0f} / {m.ttft['p99_ms']:.0f} | {m.tpot['p50_ms']:.1f} / {m.tpot['p99_ms']:.1f} | "
            f"{m.itl['p50_ms']:.1f} / {m.itl['p99_ms']:.1f} | {m.goodput:.2f} | {100 * m.slo_attainment:.0f}% |")


def disagg_lines(result: DisaggResult, spec_text: str) -> list[str]:
    """Scenario 1 in Markdown: workload, SLOs, the table, the goal."""
    g, w = result.goal, result.workload
    slos = ", ".join(f"{k.upper()} <= {v * 1e3:.0f} ms" for k, v in result.slos.items())
    lines = ["## 1. Disaggregated vs colocated", "",
             f"{spec_text} Workload at each rate (new prompts each time, the same for both deployments; "
             f"figures of the last): {w['num_requests']} requests, mean prompt {w['mean_input_len']:.0f} "
             f"tokens (max {w['max_input_len']}), mean output {w['mean_output_len']:.0f} tokens; Poisson "
             f"arrivals; the same requests and arrival times for both deployments.", "",
             f"SLOs, from the colocated run at {g['rate']:g} req/s (its p{SLO_PERCENTILE} TTFT and "
             f"p{SLO_PERCENTILE} TPOT): {slos}.", "",
             "| deployment | rate (req/s) | req/s | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) | goodput (req/s) | SLO attainment |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, by_rate in result.metrics.items():
        lines += [_row(name, rate, by_rate[rate]) for rate in sorted(by_rate)]
    lines += ["", f"Goal at {g['rate']:g} req/s: ITL p99 disaggregated / colocated = **{g['itl_p99_ratio']:.2f}** "
              f"(target <= 0.5: {'met' if g['itl_goal_met'] else 'NOT met'}); goodput "
              f"**{g['goodput_disaggregated']:.2f}** vs **{g['goodput_colocated']:.2f}** req/s "
              f"(target: higher: {'met' if g['goodput_goal_met'] else 'NOT met'}); TTFT p99 ratio "
              f"{g['ttft_p99_ratio']:.2f}.", "",
              "![latency CDFs](latency_cdf.png)", "", "![throughput vs rate](throughput_vs_rate.png)", ""]
    return lines


def engine_lines(engine: dict | None, kv: dict | None) -> list[str]:
    """Scenarios 2-4 in Markdown."""
    lines = []
    if engine:
        s, r = engine["systems"], engine["ratios"]
        lines += ["## 2-3. Continuous vs static batching; pdserve vs transformers `generate`", "",
                  f"Engine benchmark ({engine['num_requests']} requests x 128-token prompts, outputs "
                  f"capped-exponential mean 128 / cap 512, greedy, all submitted at once; make-tiny-model "
                  f"--size {engine['size']}, {engine['model']['params'] / 1e6:.1f}M params, fp32, "
                  f"{engine['threads']} torch thread): `{engine['command']}`", "",
                  "| system | output tok/s | pdserve (a) / system |", "|---|---|---|"]
        for key in sorted(s):
            ratio = "" if key == "a" else f"{r[f'a/{key}']:.2f}"
            mark = " (estimated from a subset)" if s[key]["estimated"] else ""
            lines.append(f"| {s[key]['name']}{mark} | {s[key]['tokens_per_s']:.1f} | {ratio} |")
        lines += ["", f"Continuous / static batching, same engine: **{r['a/d']:.2f}x**; pdserve / transformers "
                  f"one at a time: **{r['a/b']:.2f}x**; / transformers static batches: **{r['a/c']:.2f}x**.", ""]
    if kv:
        lines += ["## 4. KV waste: paged vs contiguous max-length allocation", "",
                  f"The same workload ({kv['num_requests']} requests), one engine run, sampled after every step: "
                  f"allocated-but-unused KV slots of the running requests, over all steps.", "",
                  "| allocation | unused slots | peak slots held |", "|---|---|---|",
                  f"| paged, block size {kv['block_size']} (pdserve) | {100 * kv['paged']['slot_weighted']:.2f}% | "
                  f"{kv['paged']['peak_allocated_slots']} |",
                  f"| contiguous, prompt + max output ({kv['max_output']}) per request | "
                  f"{100 * kv['contiguous_prompt_plus_max_output']['waste']:.1f}% | "
                  f"{kv['contiguous_prompt_plus_max_output']['peak_allocated_slots']} |",
                  f"| contiguous, max_model_len ({kv['max_model_len']}) per request | "
                  f"{100 * kv['contiguous_max_model_len']['waste']:.1f}% | "
                  f"{kv['contiguous_max_model_len']['peak_allocated_slots']} |", ""]
    if engine or kv:
        lines += ["![engine comparisons](engine.png)", ""]
    return lines


def markdown(figures: dict, disagg: DisaggResult | None, spec_text: str) -> str:
    """The whole report page."""
    p = figures["provenance"]
    lines = ["# pdserve compare report", "",
             f"Date {p['date']}, commit `{p['commit']}`, machine: {p['machine']}; 1-minute load average "
             f"{p['load_1min_before']:.2f} before, {p['load_1min_after']:.2f} after; runtime "
             f"{figures['runtime_s']:.0f} s.", "", f"Command: `{figures['command']}`", ""]
    if p.get("note"):
        lines += [p["note"], ""]
    if disagg is not None:
        lines += disagg_lines(disagg, spec_text)
    lines += engine_lines(figures.get("engine"), figures.get("kv_waste"))
    return "\n".join(lines) + "\n"
