"""A worker RPC's span and per-request metrics, from the request's trace context and the
engine's outputs: the server span (a child of the router's), the `queue` span and queue-time
histogram from the first output's queue_time_s, the `prefill.forward` span and prefill time up
to the first token, finished samples by finish reason, and the request's speculative proposals and
acceptances (span attributes, when it speculated)."""

from __future__ import annotations

import time

from opentelemetry.trace import SpanKind

from pdserve.engine.outputs import RequestOutput
from pdserve.telemetry import spans, tracing
from pdserve.telemetry.logs import bind_request
from pdserve.telemetry.metrics import WorkerMetrics


class WorkerRequestTrace:
    """One request's telemetry on a worker: feed it every engine output, then end() it.

    name: the server span's name; carrier: the request's trace_context field; grpc_context:
    the servicer context (its metadata is the fallback carrier); forward: whether the first
    output ends a prompt's forward (prefill and colocated workers) or not (decode)."""

    def __init__(self, name: str, request_id: str, carrier, grpc_context, metrics: WorkerMetrics,
                 role: str, worker_id: str, forward: bool, count_finished: bool = False):
        self.metrics = metrics
        self.forward = forward
        self.count_finished = count_finished
        self.span = spans.start(name, tracing.parent_from(carrier, grpc_context), SpanKind.SERVER)
        self.submitted_ns = time.time_ns()
        self.seen_first = False
        self.speculative: tuple[int, int] = (0, 0)  # proposed, accepted (cumulative in each output)
        bind_request(request_id, self.span)
        if self.span.is_recording():
            self.span.set_attributes({spans.GEN_AI_REQUEST_ID: request_id, spans.PDSERVE_ROLE: role,
                                      spans.PDSERVE_WORKER_ID: worker_id})

    def submitted(self) -> None:
        """The request goes to the engine now (the queue span starts here)."""
        self.submitted_ns = time.time_ns()

    def on_output(self, output: RequestOutput) -> None:
        """Account one engine output of the request."""
        if not self.seen_first:
            self.seen_first = True
            self._first_output(output)
        if output.speculative_proposed_tokens:
            self.speculative = (output.speculative_proposed_tokens, output.speculative_accepted_tokens)
        if self.count_finished:
            for sample in output.samples:
                if sample.finish_reason:
                    self.metrics.request_success.labels(sample.finish_reason).inc()

    def _first_output(self, output: RequestOutput) -> None:
        queue_s = output.queue_time_s
        if queue_s is None:
            return
        now = time.time_ns()
        scheduled_ns = min(now, self.submitted_ns + int(queue_s * 1e9))
        self.metrics.queue_time.observe(queue_s)
        spans.record(spans.QUEUE, self.span, self.submitted_ns, scheduled_ns, None)
        if self.forward:
            self.metrics.prefill_time.observe((now - scheduled_ns) / 1e9)
            spans.record(spans.PREFILL_FORWARD, self.span, scheduled_ns, now, None)
        if self.span.is_recording():
            self.span.set_attributes({spans.GEN_AI_LATENCY_QUEUE: queue_s,
                                      spans.GEN_AI_USAGE_PROMPT_TOKENS: output.prompt_tokens,
                                      spans.GEN_AI_USAGE_CACHED_TOKENS: output.cached_tokens})

    def end(self, error: BaseException | None = None, attributes: dict | None = None) -> None:
        """End the server span (failed when error is given), adding `attributes` if recorded."""
        if self.span.is_recording():
            if self.speculative[0]:
                self.span.set_attributes({spans.PDSERVE_SPECULATIVE_PROPOSED: self.speculative[0],
                                          spans.PDSERVE_SPECULATIVE_ACCEPTED: self.speculative[1]})
            if attributes:
                self.span.set_attributes(attributes)
        spans.end_with_error(self.span, error)
