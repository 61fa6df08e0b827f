"""The serving benchmark: workloads, arrivals and metrics as units, then `pdserve bench serve`
against a real cluster (tiny model, 1 prefill + 1 decode) with its JSON checked request by request."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest

from helpers.secure_switch import client_env, client_flags
from pdserve.bench.serve import ServeSettings, run_async, run_serve
from pdserve.bench.serve_arrivals import arrival_offsets
from pdserve.bench.serve_client import model_facts
from pdserve.bench.serve_conversations import ConversationSpec, run_conversations, session_messages
from pdserve.bench.serve_datasets import DatasetSpec, build_requests, sample_lengths
from pdserve.bench.serve_metrics import RequestRecord, compute_metrics, meets_slos, parse_slos, run_duration
from pdserve.bench.serve_sharegpt import DATA_FILE, format_csv, load_sharegpt_like, synthesize_sharegpt_like
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model


def test_random_and_mixed_lengths_follow_the_spec():
    spec = DatasetSpec("random", 500, input_len=100, output_len=40, range_ratio=0.5, seed=3)
    lengths = sample_lengths(spec, random.Random(spec.seed))
    assert all(50 <= p <= 150 and 20 <= o <= 60 for p, o in lengths)
    assert min(p for p, _ in lengths) < 60 and max(p for p, _ in lengths) > 140  # the range is used
    mixed = DatasetSpec("mixed", 2000, input_len=64, output_len=32, long_prompt_len=900, long_output_len=5,
                        long_fraction=0.25, seed=1)
    long = [pair for pair in sample_lengths(mixed, random.Random(1)) if pair == (900, 5)]
    assert 0.22 < len(long) / 2000 < 0.28


def test_requests_are_reproducible_in_vocabulary_and_fit_the_model():
    spec = DatasetSpec("random", 20, input_len=300, output_len=50, seed=4)
    a = build_requests(spec, vocab_size=40, max_model_len=200)
    assert a == build_requests(spec, vocab_size=40, max_model_len=200)
    assert a != build_requests(DatasetSpec("random", 20, input_len=300, output_len=50, seed=5), 40, 200)
    for r in a:
        assert r.prompt_len + r.output_len <= 200 and r.output_len == 50
        assert all(3 <= t < 40 for t in r.prompt_token_ids)


def test_shipped_sharegpt_like_lengths_are_the_documented_synthesis():
    assert DATA_FILE.read_text(encoding="utf-8") == format_csv(synthesize_sharegpt_like())
    pairs = load_sharegpt_like()
    prompts, outputs = [p for p, _ in pairs], [o for _, o in pairs]
    assert all(4 <= p <= 1024 and o >= 4 and p + o <= 2048 for p, o in pairs)
    assert 140 < statistics.mean(prompts) < 185 and 300 < statistics.mean(outputs) < 380
    spec = DatasetSpec("sharegpt", 50, sharegpt_output_len=7, seed=2)
    assert {o for _, o in sample_lengths(spec, random.Random(2))} == {7}


def test_bad_specs_and_slos_are_named():
    with pytest.raises(ValueError, match="dataset must be one of"):
        DatasetSpec("alpaca")
    with pytest.raises(ValueError, match="range_ratio"):
        DatasetSpec("random", range_ratio=1.5)
    with pytest.raises(ValueError, match="METRIC:MILLISECONDS"):
        parse_slos(["latency:5"])
    with pytest.raises(ValueError, match="not a number"):
        parse_slos(["ttft:fast"])
    assert parse_slos(["ttft:500", "tpot:20"]) == {"ttft": 0.5, "tpot": 0.02}
    with pytest.raises(ValueError, match="request rate"):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, burstiness=0.0)


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_burstiness():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    for burstiness in (0.25, 1.0, 4.0):
        offsets = arrival_offsets(20000, 5.0, burstiness, seed=1)
        gaps = [b - a for a, b in zip(offsets, offsets[1:])]
        assert offsets[0] == 0.0 and offsets == sorted(offsets)
        assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.05)
        # A gamma of shape k has a coefficient of variation 1/sqrt(k): burstier below 1.
        cv = statistics.pstdev(gaps) / statistics.mean(gaps)
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_metrics_and_goodput_from_records():
    fast = RequestRecord(10, 5, send_time=0.0, ttft=0.1, itl=[0.01] * 4, e2e=0.14, output_tokens=5, success=True)
    slow = RequestRecord(20, 3, send_time=0.5, ttft=0.3, itl=[0.2, 0.2], e2e=0.7, output_tokens=3, success=True)
    failed = RequestRecord(5, 3, send_time=1.0, error="UNAVAILABLE: no worker")
    records = [fast, slow, failed]
    assert run_duration(records) == pytest.approx(1.2)
    m = compute_metrics(records, run_duration(records), {"ttft": 0.2, "tpot": 0.05})
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (2, 1, 30, 8)
    assert fast.tpot == pytest.approx(0.01) and slow.tpot == pytest.approx(0.2)
    assert m.ttft["mean_ms"] == pytest.approx(200.0) and m.tpot["p50_ms"] == pytest.approx(105.0)
    assert m.itl["mean_ms"] == pytest.approx(1000 * (0.04 + 0.4) / 6)
    assert m.good_requests == 1 and m.goodput == pytest.approx(1 / 1.2)
    assert m.slo_attainment == pytest.approx(1 / 3)
    assert meets_slos(slow, {"e2el": 0.8}) and not meets_slos(failed, {})
    one_token = RequestRecord(3, 1, ttft=0.05, e2e=0.05, output_tokens=1, success=True)
    assert one_token.tpot is None and meets_slos(one_token, {"tpot": 0.001})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("bench-serve") / "tiny", arch="llama", seed=0)
    with LocalCluster(str(model), prefill=1, decode=1) as running:
        yield running


def test_bench_serve_command_streams_every_requested_token(cluster, tmp_path):
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--router", cluster.router_address, "--dataset-name", "mixed", "--num-prompts", "12",
            "--random-input-len", "40", "--random-output-len", "12", "--random-range-ratio", "0.5",
            "--mixed-long-prompt-len", "300", "--mixed-long-fraction", "0.25", "--request-rate", "20",
            "--burstiness", "0.5", "--goodput", "ttft:60000", "tpot:60000", "--save-result", str(out),
            "--save-detailed", "--seed", "5", *client_flags(cluster)]
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], capture_output=True,
                          text=True, timeout=180, env=client_env(cluster))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("Serving Benchmark Result", "Median TTFT (ms)", "P99 ITL (ms)", "Request goodput (req/s)",
                   "Output token throughput (tok/s)", "12/12 requests"):
        assert needle in proc.stdout + proc.stderr, needle
    figures = json.loads(out.read_text())
    spec = DatasetSpec("mixed", 12, input_len=40, output_len=12, range_ratio=0.5, long_prompt_len=300,
                       long_fraction=0.25, seed=5)
    facts = model_facts(cluster.router_address, security=cluster.client_security())
    expected = build_requests(spec, facts.vocab_size, facts.max_model_len)
    rows = figures["requests"]
    assert [(r["prompt_len"], r["output_len"]) for r in rows] == [(e.prompt_len, e.output_len) for e in expected]
    for row in rows:
        assert row["success"] and row["output_tokens"] == row["output_len"]
        assert len(row["itl"]) == row["output_len"] - 1
        assert 0 < row["ttft"] <= row["e2e"]
        assert row["e2e"] == pytest.approx(row["ttft"] + sum(row["itl"]), abs=1e-6)
    m = figures["metrics"]
    assert m["completed"] == 12 and m["total_output_tokens"] == sum(e.output_len for e in expected)
    assert m["good_requests"] == 12 and m["slo_attainment"] == 1.0
    assert {"date", "commit", "machine", "command"} <= set(figures)


def test_max_concurrency_caps_requests_in_flight(cluster):
    facts = model_facts(cluster.router_address, security=cluster.client_security())
    requests = build_requests(DatasetSpec("random", 10, input_len=20, output_len=16, seed=2),
                              facts.vocab_size, facts.max_model_len)
    run = run_serve(cluster.router_address, requests, ServeSettings(max_concurrency=2, progress=False),
                    security=cluster.client_security())
    assert run.metrics.completed == 10
    events = sorted([(r.send_time, 1) for r in run.records] + [(r.send_time + r.e2e, -1) for r in run.records],
                    key=lambda e: (e[0], e[1]))
    in_flight, peak = 0, 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    assert peak == 2


def test_conversation_sessions_resend_their_history_with_each_turn(cluster, tmp_path):
    """`bench serve --dataset-name conversation`: every turn's prompt is the session so far (shared
    system prompt, opening message, answers as served, later messages), the sessions follow the
    arrival process, and a session's turns never overlap."""
    spec = ConversationSpec(num_sessions=3, turns=3, system_prompt_len=20, first_message_len=30, user_len=5,
                            output_len=6, think_time_s=0.05, seed=4)
    system, messages = session_messages(spec, 500)
    assert (system, messages) == session_messages(spec, 500) and len(system) == 20
    assert [len(m) for m in messages[0]] == [30, 5, 5] and messages[0] != messages[1]
    facts = model_facts(cluster.router_address, security=cluster.client_security())
    run = run_async(run_conversations(cluster.router_address, spec, facts.vocab_size, facts.max_model_len, 10.0,
                                      progress=False, security=cluster.client_security()))
    assert all(r.success and r.output_tokens == 6 for r in run.records)
    assert [r.prompt_len for r in run.records] == [50, 61, 72] * 3  # history + answer + new message each turn
    for s in range(3):
        turns = run.records[3 * s:3 * s + 3]
        assert all(a.send_time + a.e2e <= b.send_time for a, b in zip(turns, turns[1:]))
    with pytest.raises(ValueError, match="context"):
        run_async(run_conversations(cluster.router_address, replace(spec, first_message_len=facts.max_model_len),
                                    facts.vocab_size, facts.max_model_len, 10.0, progress=False))
    out = tmp_path / "conversation.json"
    argv = ["bench", "serve", "--router", cluster.router_address, "--dataset-name", "conversation",
            "--conversation-sessions", "2", "--conversation-turns", "2", "--conversation-system-prompt-len", "16",
            "--conversation-first-message-len", "20", "--conversation-output-len", "4", "--request-rate", "10",
            "--save-result", str(out), *client_flags(cluster)]
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], capture_output=True,
                          text=True, timeout=180, env=client_env(cluster))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["metrics"]["completed"] == 4
