"""One Generate call's telemetry at the router: the request's root span (or a child of the
client's traceparent) and the latencies clients see (TTFT, inter-token latency, end to end),
tokens and finish reasons.

Per response the work is a clock read and a histogram observation; span attributes are only
built when the span is recorded (tracing on).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from opentelemetry.trace import SpanKind

from pdserve.models.sampling_params import SamplingParams
from pdserve.telemetry import spans, tracing
from pdserve.telemetry.logs import bind_request
from pdserve.telemetry.metrics import RouterMetrics
from pdserve.v1 import router_pb2

logger = logging.getLogger("pdserve.router")


class RequestTelemetry:
    """Span and metrics of one Generate call; observe() every response, end() once."""

    def __init__(self, metrics: RouterMetrics | None, grpc_context=None):
        self.metrics = metrics
        self.started = time.perf_counter()
        self.span = spans.start(spans.ROUTER_GENERATE, tracing.parent_from(None, grpc_context), SpanKind.SERVER)
        self.request_id = ""
        self.prompt_tokens = 0
        self.first_token_s: float | None = None
        self.last_chunk: dict[int, float] = {}  # sample index -> time of its latest chunk
        self.completion_tokens = 0
        self.finish_reasons: list[str] = []
        if metrics is not None:
            metrics.requests_in_flight.inc()

    def begin(self, request_id: str, prompt_tokens: int, params: SamplingParams) -> dict[str, str]:
        """The request is accepted: tag logs and the span; returns the trace carrier for workers."""
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        bind_request(request_id, self.span)
        if self.span.is_recording():
            self.span.set_attributes({
                spans.GEN_AI_SYSTEM: "pdserve", spans.GEN_AI_OPERATION: "text_completion",
                spans.GEN_AI_REQUEST_ID: request_id, spans.GEN_AI_USAGE_PROMPT_TOKENS: prompt_tokens,
                spans.GEN_AI_REQUEST_MAX_TOKENS: params.max_tokens,
                spans.GEN_AI_REQUEST_TEMPERATURE: params.temperature, spans.GEN_AI_REQUEST_TOP_P: params.top_p,
                spans.GEN_AI_REQUEST_TOP_K: params.top_k, spans.GEN_AI_REQUEST_N: params.n,
                spans.GEN_AI_REQUEST_SEED: params.seed, spans.PDSERVE_ROLE: "router"})
        return tracing.inject(self.span)

    def observe(self, response: router_pb2.GenerateResponse) -> None:
        """Account one response sent to the client."""
        if response.HasField("chunk"):
            if not response.chunk.token_ids:
                return
            now = time.perf_counter()
            index = response.chunk.index
            self.completion_tokens += len(response.chunk.token_ids)
            if self.first_token_s is None:
                self.first_token_s = now - self.started
                if self.metrics is not None:
                    self.metrics.time_to_first_token.observe(self.first_token_s)
            elif self.metrics is not None and index in self.last_chunk:
                self.metrics.inter_token_latency.observe(now - self.last_chunk[index])
            self.last_chunk[index] = now
        elif response.HasField("complete"):
            self.finish_reasons.append(response.complete.finish_reason)
            if self.metrics is not None:
                self.metrics.request_success.labels(response.complete.finish_reason).inc()

    def note_route(self, route: dict[str, str | int]) -> None:
        """Put the request's routing decisions on its span (the chosen workers, why, and the prompt
        tokens each was expected to hold against those it held)."""
        if route and self.span.is_recording():
            self.span.set_attributes(route)

    def end(self, error: BaseException | None = None) -> None:
        """The call is over: record latency, tokens and the outcome; end the span."""
        e2e = time.perf_counter() - self.started
        if self.metrics is not None:
            self.metrics.requests_in_flight.dec()
            if error is None:
                self.metrics.e2e_request_latency.observe(e2e)
                self.metrics.prompt_tokens.inc(self.prompt_tokens)
                self.metrics.generation_tokens.inc(self.completion_tokens)
                self.metrics.request_prompt_tokens.observe(self.prompt_tokens)
                self.metrics.request_generation_tokens.observe(self.completion_tokens)
            else:
                self.metrics.request_failure.labels(_status_name(error)).inc()
        if self.span.is_recording():
            attributes = {spans.GEN_AI_USAGE_COMPLETION_TOKENS: self.completion_tokens,
                          spans.GEN_AI_LATENCY_E2E: e2e,
                          spans.GEN_AI_RESPONSE_FINISH_REASONS: self.finish_reasons}
            if self.first_token_s is not None:
                attributes[spans.GEN_AI_LATENCY_TTFT] = self.first_token_s
            self.span.set_attributes(attributes)
        spans.end_with_error(self.span, error)
        if self.request_id:
            logger.info("request %s %s: %d prompt + %d completion tokens, ttft %s, %.3f s",
                        self.request_id, "failed" if error else "finished", self.prompt_tokens,
                        self.completion_tokens,
                        "-" if self.first_token_s is None else f"{self.first_token_s:.3f} s", e2e)


def _status_name(error: BaseException) -> str:
    """The gRPC status code name an error ends the call with (CANCELLED: the client left)."""
    from pdserve.runtime.status import status_for

    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    code, _ = status_for(error)
    return code.name if isinstance(code, grpc.StatusCode) else str(code)
