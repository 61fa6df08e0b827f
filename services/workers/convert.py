"""Engine outputs and stats into the worker protos."""

from __future__ import annotations

import time

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.stats import EngineStats
from pdserve.state.registry import WorkerLoad
from pdserve.v1 import router_pb2, worker_pb2


def request_output_to_proto(output: RequestOutput) -> worker_pb2.RequestOutput:
    """One engine step's output for a request as pdserve.v1.RequestOutput."""
    samples = [worker_pb2.SampleOutput(index=s.index, token_ids=s.token_ids, text=s.text, logprobs=s.logprobs or [],
                                       top_logprobs=_top_logprobs(s.top_logprobs or []),
                                       finish_reason=s.finish_reason or "")
               for s in output.samples]
    message = worker_pb2.RequestOutput(request_id=output.request_id, samples=samples,
                                       prompt_tokens=output.prompt_tokens, cached_tokens=output.cached_tokens,
                                       finished=output.finished)
    scores = output.prompt_logprobs
    if scores is not None:
        message.prompt_logprobs.CopyFrom(router_pb2.PromptLogprobs(
            token_ids=scores.token_ids, logprobs=scores.logprobs, top_logprobs=_top_logprobs(scores.top_logprobs)))
    return message


def _top_logprobs(rows: list[list[tuple[int, float]]]) -> list[router_pb2.TopLogprobs]:
    return [router_pb2.TopLogprobs(token_ids=[t for t, _ in row], logprobs=[lp for _, lp in row]) for row in rows]


def stats_to_load_proto(stats: EngineStats) -> worker_pb2.WorkerLoad:
    """The engine's accounting as pdserve.v1.WorkerLoad."""
    return worker_pb2.WorkerLoad(
        num_waiting_prompt_tokens=stats.num_waiting_prompt_tokens,
        num_running_requests=stats.num_running_requests, num_running_seqs=stats.num_running_seqs,
        num_waiting_requests=stats.num_waiting_requests, num_blocks_free=stats.num_blocks_free,
        num_blocks_total=stats.num_blocks_total, num_blocks_cached=stats.num_blocks_cached,
        num_reservations=stats.num_reservations, num_blocks_reserved=stats.num_blocks_reserved,
        num_finished_requests=stats.counters.num_finished_requests + stats.counters.num_aborted_requests,
        timestamp_unix_ms=int(time.time() * 1000))


def stats_to_registry_load(stats: EngineStats) -> WorkerLoad:
    """The engine's accounting as the registry's WorkerLoad (what the router balances on)."""
    return WorkerLoad(queued_prompt_tokens=stats.num_prompt_tokens_to_compute,
                      running=stats.num_running_seqs, waiting=stats.num_waiting_requests,
                      free_blocks=stats.num_blocks_free, total_blocks=stats.num_blocks_total,
                      cached_blocks=stats.num_blocks_cached)
