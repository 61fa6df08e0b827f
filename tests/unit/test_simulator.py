"""The deployment simulator: its scheduling and routing on hand-set costs, the cost fit, the
recommendation, and its predicted goodput against a real cluster's (the acceptance check)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.bench.serve_metrics import compute_metrics, run_duration
from pdserve.bench.simulate import Deployment, simulate
from pdserve.bench.simulate_calibrate import refine_on_run
from pdserve.bench.simulate_costs import FEATURES, Overheads, StepCosts, StepShape, load_costs, save_costs
from pdserve.bench.simulate_fit import StepSample, fit
from pdserve.bench.simulate_recommend import recommend, recommendation_lines

COSTS = StepCosts({"base": 1e-3, "per_token": 1e-5, "per_prefill_pair": 1e-8, "per_decode_ctx": 1e-7,
                   "per_seq": 5e-5},
                  overheads=Overheads(request_s=0.01, handoff_s=0.004, decode_step_s=2e-4, decode_per_seq_s=1e-4,
                                      prefill_scale=1.5))


def test_a_lone_request_on_a_disaggregated_pair_takes_the_modelled_times():
    (record,) = simulate([(100, 4)], [0.0], Deployment(1, 1), COSTS)
    prefill = COSTS.step_time(StepShape(prompt_chunks=((100, 0),)))
    assert record.ttft == pytest.approx(0.01 + prefill)
    steps = [COSTS.step_time(StepShape(decode_contexts=(101 + k,))) for k in range(3)]
    assert record.itl == pytest.approx([0.004 + steps[0], steps[1], steps[2]])
    assert record.e2e == pytest.approx(record.ttft + sum(record.itl)) and record.output_tokens == 4


def test_a_prompt_over_the_token_budget_is_chunked():
    (record,) = simulate([(3000, 1)], [0.0], Deployment(0, 0, 1), COSTS)
    chunks = [StepShape(prompt_chunks=((2048, 0),)), StepShape(prompt_chunks=((952, 2048),))]
    assert record.ttft == pytest.approx(0.01 + sum(COSTS.step_time(c) for c in chunks))


def test_a_long_prompt_stalls_colocated_decodes_but_not_disaggregated_ones():
    lengths, offsets = [(10, 60), (1500, 2)], [0.0, 0.03]
    mixed_step = COSTS.step_time(StepShape(prompt_chunks=((1500, 0),), decode_contexts=(40,)))
    colocated = simulate(lengths, offsets, Deployment(0, 0, 1), COSTS)[0]
    disaggregated = simulate(lengths, offsets, Deployment(1, 1), COSTS)[0]
    assert max(colocated.itl) == pytest.approx(mixed_step, rel=0.05)
    assert max(disaggregated.itl[1:]) < mixed_step / 10


def test_the_router_spreads_prompts_over_prefill_servers():
    records = simulate([(500, 1), (500, 1)], [0.0, 0.0], Deployment(2, 1), COSTS)
    alone = 0.01 + COSTS.step_time(StepShape(prompt_chunks=((500, 0),)))
    assert [r.ttft for r in records] == pytest.approx([alone, alone])
    packed = simulate([(500, 1), (500, 1)], [0.0, 0.0], Deployment(1, 1), COSTS)
    assert packed[1].ttft > alone  # one server computes both prompts in one step


def test_fit_recovers_known_coefficients():
    truth = StepCosts({"base": 2e-3, "per_token": 3e-5, "per_prefill_pair": 5e-8, "per_decode_ctx": 2e-7,
                       "per_seq": 4e-5})
    shapes = [StepShape(prompt_chunks=((n, 0),)) for n in (16, 128, 512, 1024, 2048)]
    shapes += [StepShape(prompt_chunks=((64, 0),) * 8)]
    shapes += [StepShape(decode_contexts=(c,) * b) for b in (1, 4, 16, 32) for c in (40, 300)]
    fitted = fit([StepSample(s, truth.engine_time(s)) for s in shapes])
    assert [fitted[f] for f in FEATURES] == pytest.approx([truth.coefficients[f] for f in FEATURES], rel=1e-6)


def test_recommendation_adds_prefill_servers_for_a_prefill_heavy_load():
    rng = np.random.default_rng(0)
    lengths = [(1500, 4)] * 200  # 58 ms of prefill each at 30 req/s: 1.7 prefill servers busy
    offsets = list(np.cumsum(rng.exponential(1 / 30.0, size=200)))
    slos = {"ttft": 0.5, "tpot": 0.05}
    rec = recommend(lengths, offsets, COSTS, slos, max_servers=6, attainment=0.9)
    assert rec.best is not None and rec.best.deployment.prefill > rec.best.deployment.decode
    assert rec.best.metrics.slo_attainment >= 0.9
    smaller = [c for c in rec.candidates if not c.deployment.colocated
               and c.deployment.prefill + c.deployment.decode < rec.best.deployment.prefill + rec.best.deployment.decode]
    assert all(c.metrics.slo_attainment < 0.9 for c in smaller)
    assert "recommended:" in recommendation_lines(rec)[-1]
    impossible = recommend(lengths, offsets, COSTS, {"ttft": 1e-4}, max_servers=3)
    assert impossible.best is None and "no split" in recommendation_lines(impossible)[-1]


def test_profiles_round_trip_and_bad_input_is_named(tmp_path):
    path = save_costs(COSTS, tmp_path / "p.json")
    assert load_costs(path) == COSTS
    with pytest.raises(ValueError, match="coefficients must be >= 0"):
        StepCosts({**COSTS.coefficients, "base": -1.0})
    with pytest.raises(ValueError, match="missing coefficients"):
        StepCosts({"base": 1.0})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a step-cost profile"):
        load_costs(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="prefill >= 1 and decode >= 1"):
        Deployment(1, 0)
    with pytest.raises(ValueError, match="prefill >= 1 and decode >= 1"):
        Deployment(1, 1, 2)
    assert compute_metrics(simulate([(5, 2)], [0.0], Deployment(0, 0, 1), COSTS), 1.0).completed == 1
    assert run_duration([]) > 0


def test_refining_on_a_measured_run_recovers_its_overheads():
    rng = np.random.default_rng(1)
    lengths = [(int(p), int(o)) for p, o in zip(rng.integers(20, 1000, 60), rng.integers(2, 30, 60))]
    offsets = list(np.cumsum(rng.exponential(1 / 6.0, size=60)))
    truth = Overheads(request_s=0.02, handoff_s=0.004, decode_step_s=0.001, decode_per_seq_s=1e-4, prefill_scale=1.7)
    measured = simulate(lengths, offsets, Deployment(1, 1), COSTS.with_overheads(truth))
    start = Overheads(handoff_s=0.004, decode_per_seq_s=1e-4)
    refined = refine_on_run(COSTS.with_overheads(start), lengths, offsets, Deployment(1, 1), measured, rounds=4)
    assert refined.prefill_scale == pytest.approx(1.7, rel=0.1)
    assert refined.request_s == pytest.approx(0.02, rel=0.15)
    assert refined.decode_step_s == pytest.approx(0.001, rel=0.15)
