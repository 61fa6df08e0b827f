"""PNG plots of the compare report (matplotlib, the `bench` extra): latency CDFs of both
deployments at the reference rate, throughput/goodput/ITL p99 against the request rate, and
the engine comparisons (throughput of each system, KV waste of each allocation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdserve.bench.compare_disagg import LABELS, DisaggResult

COLORS = {"colocated": "tab:orange", "disaggregated": "tab:blue"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("the compare plots need matplotlib: pip install 'pdserve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: list[float], label: str, color: str) -> None:
    xs = np.sort(np.asarray(values_ms))
    ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label, color=color)


def latency_cdfs(result: DisaggResult, rate: float, path: Path) -> Path:
    """TTFT, TPOT and ITL CDFs of both deployments at `rate`, with the SLOs marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, by_rate in result.records.items():
        ok = [r for r in by_rate[rate] if r.success]
        series = {"TTFT": [r.ttft * 1e3 for r in ok],
                  "TPOT": [r.tpot * 1e3 for r in ok if r.tpot is not None],
                  "ITL": [g * 1e3 for r in ok for g in r.itl]}
        for ax, (metric, values) in zip(axes, series.items()):
            _cdf(ax, values, LABELS[name], COLORS[name])
    for ax, metric in zip(axes, ("TTFT", "TPOT", "ITL")):
        slo = result.slos.get(metric.lower())
        if slo:
            ax.axvline(slo * 1e3, color="gray", linestyle="--", label=f"SLO {slo * 1e3:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric} (ms, log scale)")
        ax.set_ylabel("fraction of " + ("tokens" if metric == "ITL" else "requests"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Latency CDFs at {rate:g} req/s (mixed workload)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_rate(result: DisaggResult, path: Path) -> Path:
    """Output tokens/s, goodput and ITL p99 of both deployments against the offered rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("output tokens/s", lambda m: m.output_throughput), ("goodput (req/s meeting both SLOs)",
              lambda m: m.goodput), ("ITL p99 (ms)", lambda m: m.itl["p99_ms"]))
    for name, by_rate in result.metrics.items():
        rates = sorted(by_rate)
        for ax, (label, value) in zip(axes, panels):
            ax.plot(rates, [value(by_rate[r]) for r in rates], marker="o", label=LABELS[name], color=COLORS[name])
    for ax, (label, _) in zip(axes, panels):
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput, goodput and ITL p99 against request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def engine_bars(engine: dict | None, kv: dict | None, path: Path) -> Path:
    """Output tokens/s of the engine benchmark's systems, and KV waste of each allocation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    if engine:
        systems = engine["systems"]
        names = [systems[k]["name"].replace(", ", ",\n", 1) for k in sorted(systems)]
        axes[0].barh(names, [systems[k]["tokens_per_s"] for k in sorted(systems)], color="tab:blue")
        axes[0].invert_yaxis()
        axes[0].set_xlabel("output tokens/s")
        axes[0].set_title("Scenarios 2-3: engine throughput")
    if kv:
        labels = ["paged (block 16)", "contiguous, prompt +\nmax output", "contiguous,\nmax_model_len"]
        values = [kv["paged"]["slot_weighted"], kv["contiguous_prompt_plus_max_output"]["waste"],
                  kv["contiguous_max_model_len"]["waste"]]
        axes[1].bar(labels, [100 * v for v in values], color=["tab:blue", "tab:orange", "tab:red"])
        axes[1].set_ylabel("KV slots allocated but unused (%)")
        axes[1].set_title("Scenario 4: KV waste")
    for ax in axes:
        ax.grid(True, axis="x" if ax is axes[0] else "y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
