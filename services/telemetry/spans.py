"""Span names and attribute keys of a request's trace, and small helpers to record spans.

One trace per request:

    Router/Generate (router, SERVER)                      gen_ai.request.* / gen_ai.usage.* / TTFT
    ├── decode.reserve (decode, SERVER)
    ├── prefill (prefill, SERVER)
    │   ├── queue                                          time in the engine's waiting queue
    │   ├── prefill.forward                                first scheduled -> first token
    │   └── kv.transfer (PRODUCER)                         bytes, blocks, frames, seconds
    │       └── kv.receive (decode, CONSUMER)              parent carried in the KV handshake
    └── decode (decode, SERVER)
        ├── kv.wait                                        until the prompt's KV is in
        └── queue                                          ready queue -> running batch

Attribute names follow the `gen_ai.*` ones vLLM emits (gen_ai.request.id, gen_ai.usage.*,
gen_ai.latency.*); pdserve's own are `pdserve.*`.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from pdserve.telemetry import tracing

ROUTER_GENERATE = "pdserve.v1.Router/Generate"
WORKER_GENERATE = "worker.generate"
DECODE_RESERVE = "decode.reserve"
PREFILL = "prefill"
DECODE = "decode"
QUEUE = "queue"
PREFILL_FORWARD = "prefill.forward"
KV_TRANSFER = "kv.transfer"
KV_RECEIVE = "kv.receive"
KV_WAIT = "kv.wait"

GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_REQUEST_ID = "gen_ai.request.id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_N = "gen_ai.request.n"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
GEN_AI_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
GEN_AI_USAGE_CACHED_TOKENS = "gen_ai.usage.cached_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_LATENCY_TTFT = "gen_ai.latency.time_to_first_token"
GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"
GEN_AI_LATENCY_QUEUE = "gen_ai.latency.time_in_queue"

PDSERVE_ROLE = "pdserve.role"
PDSERVE_WORKER_ID = "pdserve.worker.id"
PDSERVE_RESERVATION_ID = "pdserve.kv.reservation_id"
PDSERVE_KV_ENDPOINT = "pdserve.kv.endpoint"
PDSERVE_KV_BYTES = "pdserve.kv.bytes"
PDSERVE_KV_BLOCKS = "pdserve.kv.blocks"
PDSERVE_KV_LAYERS = "pdserve.kv.layers"
PDSERVE_KV_FRAMES = "pdserve.kv.frames"
PDSERVE_KV_SECONDS = "pdserve.kv.seconds"
PDSERVE_SPECULATIVE_PROPOSED = "pdserve.speculative.proposed_tokens"  # a request's proposals verified on a server
PDSERVE_SPECULATIVE_ACCEPTED = "pdserve.speculative.accepted_tokens"
PDSERVE_KV_DATA_PATH = "pdserve.kv.data_path"  # how the K/V bytes moved: tcp or nixl


def start(name: str, parent: Context | trace.Span | None, kind: SpanKind = SpanKind.INTERNAL,
          start_ns: int | None = None) -> trace.Span:
    """Start a span under `parent` (a context, a span, or None for a new trace)."""
    if isinstance(parent, trace.Span):
        parent = tracing.child_context(parent)
    return tracing.tracer().start_span(name, context=parent, kind=kind, start_time=start_ns)


def record(name: str, parent: trace.Span, start_ns: int, end_ns: int, attributes: dict | None = None,
           kind: SpanKind = SpanKind.INTERNAL) -> None:
    """A span that already happened, from start_ns to end_ns (Unix ns), under `parent`; a no-op
    unless the parent is recorded."""
    if not parent.is_recording():
        return
    span = start(name, parent, kind, start_ns)
    if attributes:
        span.set_attributes(attributes)
    span.end(end_time=max(end_ns, start_ns))


def end_with_error(span: trace.Span, error: BaseException | None) -> None:
    """End a span, marking it failed (with the exception) when error is given."""
    if error is not None and span.is_recording():
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.record_exception(error)
    span.end()


def now_ns() -> int:
    """Unix time in nanoseconds (span timestamps)."""
    return time.time_ns()
