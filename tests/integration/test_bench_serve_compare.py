"""`pdserve bench compare` at a tiny scale: scenario 1 on real clusters (colocated, then 1 prefill
+ 1 decode) and scenario 4 on a real engine, with the JSON, Markdown and PNG report checked.
Scenarios 2-3 are the engine benchmark, tested in test_engine_bench.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.bench.compare_engine import run_kv_waste

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_the_report_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    argv = ["bench", "compare", "--out", str(out), "--only", "1,4", "--size", "tiny", "--num-prompts", "6",
            "--rates", "3,6", "--engine-requests", "4"]
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((out / "report.json").read_text())
    runs = figures["disaggregation"]["runs"]
    assert set(runs) == {"colocated", "disaggregated"}
    for by_rate in runs.values():
        assert set(by_rate) == {"3.0", "6.0"}
        assert all(m["completed"] == 6 and m["failed"] == 0 for m in by_rate.values())
    slos = figures["disaggregation"]["slos_ms"]
    assert slos["ttft"] > 0 and slos["tpot"] > 0
    goal = figures["disaggregation"]["goal"]
    assert goal["rate"] == 6.0 and goal["itl_p99_ratio"] > 0  # the middle of two rates: the upper one
    assert {"date", "commit", "machine", "load_1min_before"} <= set(figures["provenance"])
    report = (out / "report.md").read_text()
    for needle in ("## 1. Disaggregated vs colocated", "## 4. KV waste", "SLOs, from the colocated run",
                   "latency_cdf.png", "throughput_vs_rate.png", "engine.png", "Command: `pdserve bench compare"):
        assert needle in report, needle
    for name in ("latency_cdf.png", "throughput_vs_rate.png", "engine.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_paged_kv_waste_is_far_below_contiguous_max_length_allocation():
    kv = run_kv_waste(num_requests=8, seed=1, prompt_len=40, mean_output=24, max_output=64)
    paged = kv["paged"]["slot_weighted"]
    capped = kv["contiguous_prompt_plus_max_output"]["waste"]
    full = kv["contiguous_max_model_len"]["waste"]
    # Paged: only each request's last block is partly empty (< block_size / tokens held).
    assert 0.0 < paged < 16 / 40
    assert paged < capped < full < 1.0
    assert kv["paged"]["peak_allocated_slots"] < kv["contiguous_prompt_plus_max_output"]["peak_allocated_slots"]
