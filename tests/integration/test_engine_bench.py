"""Smoke test of the engine benchmark at a tiny scale (figures printed and returned, not timed),
plus its workload and KV-waste accounting on a real engine."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from helpers.engine_testing import load_tiny, one_torch_thread, random_prompt
from pdserve.bench.engine_bench_kv import KVWasteMeter
from pdserve.bench.engine_bench_workload import make_workload, spread_subset
from pdserve.models.sampling_params import SamplingParams


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_benchmark_script_prints_and_writes_its_figures(tmp_path, dtype):
    """float32: pdserve and transformers give the same greedy tokens. bfloat16 (the default, with
    the engine's linear layers packed for oneDNN): transformers rounds differently, so only the
    two pdserve systems must agree."""
    out = tmp_path / "figures.json"
    argv = ["--size", "tiny", "--num-requests", "6", "--prompt-len", "16", "--mean-output", "8",
            "--max-output", "24", "--static-batch", "2", "--hf-single-requests", "3", "--threads", "1",
            "--dtype", dtype, "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "pdserve.bench.engine_bench", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    total = figures["total_output_tokens"]
    assert set(figures["systems"]) == {"a", "b", "c", "d"}
    for key, system in figures["systems"].items():
        assert system["output_tokens"] == total, key
        assert system["seconds"] > 0 and system["tokens_per_s"] > 0, key
    assert figures["systems"]["b"]["estimated"] and "ESTIMATED" in proc.stdout
    assert set(figures["ratios"]) == {"a/b", "a/c", "a/d"}
    assert all(r > 0 for r in figures["ratios"].values())
    assert 0.0 < figures["kv_waste"]["slot_weighted"] < 1.0
    assert figures["dtype"] == dtype and (figures["model"]["packed_linears"] > 0) == (dtype == "bfloat16")
    # Greedy tokens: the static engine (and, in float32, transformers) agree with the continuous one.
    for pair in ("a_vs_b", "a_vs_c", "a_vs_d") if dtype == "float32" else ("a_vs_d",):
        p = figures["parity"][pair]
        assert p["identical"] == p["requests"] > 0, pair
    for needle in ("a/b = ", "a/c = ", "a/d = ", "KV waste of (a)", "commit ", "torch threads 1",
                   f"{dtype}, CPU",
                   "command: python -m pdserve.bench.engine_bench"):
        assert needle in proc.stdout, needle


def test_workload_is_reproducible_and_within_bounds():
    w = make_workload(200, 5, mean_output=20, max_output=40, vocab_size=50, seed=7)
    assert w == make_workload(200, 5, mean_output=20, max_output=40, vocab_size=50, seed=7)
    assert w != make_workload(200, 5, mean_output=20, max_output=40, vocab_size=50, seed=8)
    assert all(len(p) == 5 and all(3 <= t < 50 for t in p) for p in w.prompts)
    assert all(1 <= n <= 40 for n in w.output_lens) and 40 in w.output_lens  # the cap is hit
    assert spread_subset(64, 16) == list(range(0, 64, 4))
    assert spread_subset(5, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="mean"):
        make_workload(4, 5, mean_output=0, max_output=40, vocab_size=50)


def test_kv_waste_meter_counts_the_unused_tail_of_each_last_block(tmp_path):
    with one_torch_thread():
        tiny = load_tiny(tmp_path / "tiny")
        engine = tiny.engine(num_blocks=64)
        rng = random.Random(0)
        prompt_lens = (20, 33)
        for i, n in enumerate(prompt_lens):
            engine.add_request(str(i), random_prompt(rng, n), SamplingParams(max_tokens=3, temperature=0))
        meter = KVWasteMeter()
        engine.step()  # both prompts computed: 20 tokens in 2 blocks, 33 in 3
        meter.sample(engine)
    allocated = sum(-(-n // 16) * 16 for n in prompt_lens)
    assert meter.allocated_slot_steps == allocated
    assert meter.unused_slot_steps == allocated - sum(prompt_lens)
    assert meter.slot_weighted == pytest.approx(1 - sum(prompt_lens) / allocated)
