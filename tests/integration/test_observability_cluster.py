"""Traces, metrics and logs of a real cluster (embedded Redis, prefill, decode, router as
processes) exporting over OTLP to a receiver in this process."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.observability_testing import generate_all, request_for, scrape, wait_until
from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.telemetry import spans as S
from pdserve.telemetry.otlp_sink import OTLPTraceSink

BLOCK_SIZE = 16
# make_tiny_model's llama: 2 layers, 2 KV heads of 32 dims, float32: K and V of one block.
KV_BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 2 * 32 * 4


@pytest.fixture(scope="module")
def traced_cluster(tmp_path_factory, kv_transfer):
    """One prefill and one decode server and the router, all exporting spans to `sink`."""
    model = make_tiny_model(tmp_path_factory.mktemp("obs") / "tiny", arch="llama", seed=0)
    sink = OTLPTraceSink.start()
    cluster = LocalCluster(str(model), prefill=1, decode=1,
                           extra_args=["--otlp-endpoint", sink.endpoint, "--log-json", "--kv-cache-mb", "32"],
                           env={"OTEL_BSP_SCHEDULE_DELAY": "50", "PDSERVE_KV_TRANSFER": kv_transfer})
    with cluster:
        yield cluster, sink, kv_transfer
    sink.stop()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _trace_of(sink, request_id: str, names: set[str]) -> dict[str, list]:
    """The spans of the trace whose router span carries request_id, once `names` are all in."""
    def trace_spans(spans):
        roots = [s for s in spans
                 if s.name == S.ROUTER_GENERATE and s.attributes.get(S.GEN_AI_REQUEST_ID) == request_id]
        return [s for s in spans if roots and s.trace_id == roots[0].trace_id]

    spans = trace_spans(sink.wait_for(lambda got: names <= {s.name for s in trace_spans(got)}, timeout_s=30))
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    return by_name


def test_one_request_is_one_trace_across_router_prefill_transfer_and_decode(traced_cluster):
    cluster, sink, data_path = traced_cluster
    prompt = _prompt(20, seed=1)  # 2 KV blocks
    (result,) = generate_all(cluster.router_address, [request_for(
        prompt, 6, "trace-1", temperature=0.5, top_p=0.75, seed=3)], security=cluster.client_security())
    assert result.error is None and len(result.token_ids) == 6
    names = {S.ROUTER_GENERATE, S.DECODE_RESERVE, S.PREFILL, S.QUEUE, S.PREFILL_FORWARD, S.KV_TRANSFER,
             S.KV_RECEIVE, S.DECODE, S.KV_WAIT}
    t = _trace_of(sink, "trace-1", names)
    assert {name: len(found) for name, found in t.items()} == {**{n: 1 for n in names}, S.QUEUE: 2}
    root, reserve, prefill, decode = t[S.ROUTER_GENERATE][0], t[S.DECODE_RESERVE][0], t[S.PREFILL][0], t[S.DECODE][0]
    kv, receive = t[S.KV_TRANSFER][0], t[S.KV_RECEIVE][0]
    # Who sent what, and the parent links.
    assert (root.service, root.kind, root.parent_span_id) == ("pdserve-router", "SERVER", "")
    assert {s.service for s in (reserve, decode, receive, t[S.KV_WAIT][0])} == {"pdserve-decode"}
    assert {s.service for s in (prefill, kv, t[S.PREFILL_FORWARD][0])} == {"pdserve-prefill"}
    assert reserve.parent_span_id == prefill.parent_span_id == decode.parent_span_id == root.span_id
    assert kv.parent_span_id == t[S.PREFILL_FORWARD][0].parent_span_id == prefill.span_id
    assert receive.parent_span_id == kv.span_id  # the context came in the KV handshake
    assert t[S.KV_WAIT][0].parent_span_id == decode.span_id
    assert sorted(q.parent_span_id for q in t[S.QUEUE]) == sorted([prefill.span_id, decode.span_id])
    # Attributes.
    a = root.attributes
    assert a[S.GEN_AI_REQUEST_ID] == "trace-1" and a[S.GEN_AI_USAGE_PROMPT_TOKENS] == 20
    assert a[S.GEN_AI_USAGE_COMPLETION_TOKENS] == 6 and a[S.GEN_AI_REQUEST_MAX_TOKENS] == 6
    assert a[S.GEN_AI_REQUEST_TEMPERATURE] == pytest.approx(0.5) and a[S.GEN_AI_REQUEST_TOP_P] == pytest.approx(0.75)
    assert a[S.GEN_AI_REQUEST_SEED] == 3 and a[S.GEN_AI_RESPONSE_FINISH_REASONS] == ["length"]
    assert 0 < a[S.GEN_AI_LATENCY_TTFT] < a[S.GEN_AI_LATENCY_E2E]
    assert prefill.attributes[S.GEN_AI_REQUEST_ID] == decode.attributes[S.GEN_AI_REQUEST_ID] == "trace-1"
    assert prefill.attributes[S.GEN_AI_USAGE_PROMPT_TOKENS] == 20
    assert decode.attributes[S.GEN_AI_USAGE_COMPLETION_TOKENS] == 5  # the first token came from prefill
    for span in (kv, receive):
        assert span.attributes[S.PDSERVE_KV_BYTES] == 2 * KV_BYTES_PER_BLOCK
        assert span.attributes[S.PDSERVE_KV_BLOCKS] == 2 and span.attributes[S.PDSERVE_KV_SECONDS] > 0
        assert span.attributes[S.PDSERVE_KV_DATA_PATH] == data_path
    assert kv.attributes[S.PDSERVE_RESERVATION_ID] == receive.attributes[S.PDSERVE_RESERVATION_ID]
    # Times nest: the spans of a server start inside the router's; those the router waits out end
    # inside it too. The decode stream's span ends when its handler returns, after sending the last
    # token, which the router may already have received and closed its own span on.
    for span in (reserve, prefill, decode):
        assert root.start_ns <= span.start_ns <= span.end_ns
        assert span.start_ns <= root.end_ns
    for span in (reserve, prefill):
        assert span.end_ns <= root.end_ns


def test_a_clients_traceparent_is_continued(traced_cluster):
    cluster, sink, data_path = traced_cluster
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    (result,) = generate_all(cluster.router_address, [request_for(_prompt(5, seed=2), 3, "client-traced")],
                             metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
                             security=cluster.client_security())
    assert result.error is None
    t = _trace_of(sink, "client-traced", {S.ROUTER_GENERATE, S.DECODE})
    root = t[S.ROUTER_GENERATE][0]
    assert (root.trace_id, root.parent_span_id) == (trace_id, parent_id)
    assert t[S.DECODE][0].trace_id == trace_id


def test_metrics_of_every_server_count_the_traffic(traced_cluster):
    cluster, _, data_path = traced_cluster
    servers = {p.role: p.metrics_address for p in cluster.processes}
    assert set(servers) == {"router", "prefill", "decode"} and all(servers.values())
    before = {role: scrape(address) for role, address in servers.items()}
    prompts = [_prompt(10 + 7 * i, seed=100 + i) for i in range(5)]  # 10..38 tokens: 1-3 blocks
    results = generate_all(cluster.router_address, [request_for(p, 5) for p in prompts],
                           security=cluster.client_security())
    assert all(r.error is None and len(r.token_ids) == 5 for r in results)
    blocks = sum(-(-len(p) // BLOCK_SIZE) for p in prompts)

    def delta(role: str, name: str) -> float:
        return scrape(servers[role]).get(name, 0.0) - before[role].get(name, 0.0)

    def kv(name: str, **labels: str) -> str:  # a KV metric of this cluster's data path
        return f"pdserve:kv_{name}{{data_path={data_path},{','.join(f'{k}={v}' for k, v in labels.items())}}}"

    # The prefill side's transfer ends in the background: wait for its count.
    wait_until(lambda: delta("prefill", kv("transfers_total", direction="sent", outcome="ok")) == 5, 20,
               "the prefill server to count 5 KV transfers")
    router = {name: delta("router", name) for name in (
        "pdserve:time_to_first_token_seconds_count", "pdserve:e2e_request_latency_seconds_count",
        "pdserve:inter_token_latency_seconds_count", "pdserve:generation_tokens_total",
        "pdserve:prompt_tokens_total", "pdserve:request_success_total{finished_reason=length}")}
    assert router == {"pdserve:time_to_first_token_seconds_count": 5, "pdserve:e2e_request_latency_seconds_count": 5,
                      "pdserve:inter_token_latency_seconds_count": 5 * 4, "pdserve:generation_tokens_total": 25,
                      "pdserve:prompt_tokens_total": sum(map(len, prompts)),
                      "pdserve:request_success_total{finished_reason=length}": 5}
    assert delta("prefill", "pdserve:request_queue_time_seconds_count") == 5
    assert delta("prefill", "pdserve:request_prefill_time_seconds_count") == 5
    assert delta("prefill", kv("transfer_bytes_total", direction="sent")) == blocks * KV_BYTES_PER_BLOCK
    assert delta("prefill", "pdserve:prefix_cache_queries_total") == sum(map(len, prompts))
    assert delta("decode", kv("transfer_bytes_total", direction="received")) == blocks * KV_BYTES_PER_BLOCK
    assert delta("decode", kv("transfer_duration_seconds_count", direction="received")) == 5
    assert delta("decode", "pdserve:request_success_total{finished_reason=length}") == 5
    assert delta("decode", "pdserve:request_queue_time_seconds_count") == 5
    assert delta("decode", "pdserve:engine_generated_tokens_total") == 5 * 4
    after = {role: scrape(address) for role, address in servers.items()}
    for role in ("prefill", "decode"):
        assert after[role]["pdserve:num_requests_running"] == 0 and after[role]["pdserve:num_requests_waiting"] == 0
        assert after[role]["pdserve:kv_cache_blocks_used"] == 0 and after[role]["pdserve:kv_cache_blocks_free"] > 0
        assert "pdserve:num_preemptions_total" in after[role] and "pdserve:prefix_cache_hit_rate" in after[role]
    assert after["router"]["pdserve:router_requests_in_flight"] == 0


def test_json_logs_carry_the_request_and_trace_ids(traced_cluster):
    cluster, sink, data_path = traced_cluster
    (result,) = generate_all(cluster.router_address, [request_for(_prompt(4, seed=5), 2, "logged-1")],
                             security=cluster.client_security())
    assert result.error is None
    root = _trace_of(sink, "logged-1", {S.ROUTER_GENERATE})[S.ROUTER_GENERATE][0]
    log_path = next(p.log_path for p in cluster.processes if p.role == "router")
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    mine = [e for e in entries if e.get("request_id") == "logged-1"]
    assert mine and all(e["trace_id"] == root.trace_id and e["service"] == "pdserve-router" for e in mine)
