"""`pdserve bench routing`'s report: ratios kv against load and each target's verdict, from records and
server counters (the cluster runs are exercised by the benchmark itself and tests/integration)."""

from __future__ import annotations

from pdserve.bench.routing_compare import WorkloadRun, markdown, report
from pdserve.bench.serve_metrics import RequestRecord


def records(ttfts: list[float], start: float = 0.0) -> list[RequestRecord]:
    return [RequestRecord(100, 4, send_time=start + i, ttft=t, itl=[0.01] * 3, e2e=t + 0.03, output_tokens=4,
                          success=True) for i, t in enumerate(ttfts)]


def counters(prefill_tokens: float, kv_bytes: float, prefill_requests: dict[str, float]) -> dict:
    return {"prefill_tokens_computed": {"prefill-0": prefill_tokens}, "kv_bytes_received": {"decode-2": kv_bytes},
            "kv_blocks_held": {"decode-2": 0.0}, "kv_blocks_transferred": {"decode-2": 0.0},
            "prefill_requests": prefill_requests, "decode_requests": {"decode-2": 5.0, "decode-3": 5.0}}


def runs(kv_prefill_tokens: float, kv_ttft: float, kv_answers: list[list[int]], kv_shares: dict[str, float]):
    even = {"prefill-0": 5.0, "prefill-1": 5.0}
    load = {"conversation": WorkloadRun(records([0.4] * 10), [[1, 2]] * 10, counters(9000, 4e6, even)),
            "random": WorkloadRun(records([0.1] * 10), counters=counters(5000, 1e6, even))}
    kv = {"conversation": WorkloadRun(records([kv_ttft] * 10), kv_answers, counters(kv_prefill_tokens, 1e6, even)),
          "random": WorkloadRun(records([0.1] * 10), counters=counters(5000, 1e6, kv_shares))}
    return {"load": load, "kv": kv}


def test_every_target_is_judged_and_can_fail():
    good = report(runs(2000, 0.1, [[1, 2]] * 10, {"prefill-0": 5.0, "prefill-1": 5.0}))["verdict"]
    assert good["same_greedy_answers"] and good["prefill_tokens_ratio"] == 4.5 and good["kv_bytes_ratio"] == 4.0
    assert all(value for key, value in good.items() if key.endswith("_met")), good
    bad = report(runs(4000, 0.3, [[1, 2]] * 9 + [[1, 3]], {"prefill-0": 9.0, "prefill-1": 1.0}))
    verdict = bad["verdict"]
    assert not verdict["same_greedy_answers"] and verdict["differing_answers"] == 1
    assert not verdict["prefill_tokens_ratio_met"] and not verdict["ttft_p50_ratio_met"]
    assert not verdict["random_share_met"] and verdict["random_max_server_share_kv"] == 0.9
    table = markdown(bad, "pdserve bench routing")
    assert "MISSED" in table and "NO (1 of 10 differ)" in table


def test_a_request_that_failed_under_one_policy_is_counted_apart_not_as_a_different_answer():
    failing = runs(2000, 0.1, [[1, 2]] * 9 + [[]], {"prefill-0": 5.0, "prefill-1": 5.0})
    failing["kv"]["conversation"].records[-1].success = False
    verdict = report(failing)["verdict"]
    assert verdict["same_greedy_answers"] and verdict["compared_answers"] == 9 and verdict["differing_answers"] == 0
    assert (verdict["failed_load"], verdict["failed_kv"]) == (0, 1)
