"""The serving benchmark's summary table and its --save-result JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from pdserve.bench.engine_bench_report import git_commit, now_utc
from pdserve.bench.serve_metrics import RequestRecord, ServeMetrics

REPO_ROOT = Path(__file__).resolve().parents[2]
LATENCIES = (("ttft", "Time to First Token", "TTFT"),
             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"),
             ("e2el", "End-to-end Latency", "E2EL"))


def provenance() -> dict:
    """Date, commit, machine and load: what every reported figure carries."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"date": now_utc(), "commit": git_commit(REPO_ROOT),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()} "
                       f"{platform.release()}, Python {platform.python_version()}",
            "load_1min": load}


def summary_lines(m: ServeMetrics, title: str = "Serving Benchmark Result") -> list[str]:
    """The vLLM-style result table (plain text)."""
    def row(label: str, value) -> str:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<40}{text:>12}"

    lines = [f"{' ' + title + ' ':=^52}",
             row("Successful requests:", m.completed), row("Failed requests:", m.failed),
             row("Benchmark duration (s):", m.duration_s),
             row("Total input tokens:", m.total_input_tokens),
             row("Total generated tokens:", m.total_output_tokens),
             row("Request throughput (req/s):", m.request_throughput),
             row("Output token throughput (tok/s):", m.output_throughput),
             row("Total token throughput (tok/s):", m.total_token_throughput)]
    if m.slos_ms:
        slos = " ".join(f"{k}:{v:g}" for k, v in m.slos_ms.items())
        lines += [row("Goodput SLOs (ms):", slos), row("Request goodput (req/s):", m.goodput),
                  row("SLO attainment (%):", 100.0 * m.slo_attainment)]
    for key, heading, short in LATENCIES:
        stats = getattr(m, key)
        lines.append(f"{heading:-^52}")
        lines += [row(f"Mean {short} (ms):", stats["mean_ms"]), row(f"Median {short} (ms):", stats["p50_ms"]),
                  row(f"P90 {short} (ms):", stats["p90_ms"]), row(f"P99 {short} (ms):", stats["p99_ms"])]
    lines.append("=" * 52)
    return lines


def record_dicts(records: list[RequestRecord]) -> list[dict]:
    """Per-request timings for the JSON (seconds), errors included."""
    return [{"prompt_len": r.prompt_len, "output_len": r.output_len, "send_time": r.send_time,
             "ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e, "output_tokens": r.output_tokens,
             "itl": r.itl, "success": r.success, "error": r.error} for r in records]


def write_json(path: str | Path, figures: dict) -> Path:
    """Write figures as indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return path
