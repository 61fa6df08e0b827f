"""Worker outputs (pdserve.v1.RequestOutput) into the public GenerateResponse stream."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.pdserve.v1 import router_pb2, worker_pb2


@dataclass
class SampleProgressState:
    """What the client has been sent for one sample."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class StreamState:
    """Per-request relay state: samples' progress, prompt and cached token counts."""

    request_id: str
    prompt_tokens: int
    samples: list[SampleProgressState]
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        """Every sample has its finish reason."""
        return all(s.finish_reason is not None for s in self.samples)


def responses_for(state: StreamState, output: worker_pb2.RequestOutput,
                  include_text: bool = True) -> list[router_pb2.GenerateResponse]:
    """Turn one worker output into client responses (a chunk per sample that progressed, then a
    completion per sample that finished), updating `state`."""
    state.cached_tokens = max(state.cached_tokens, output.cached_tokens)
    responses = []
    for sample in output.samples:
        progress = state.samples[sample.index]
        if progress.finish_reason is not None:
            continue
        if sample.token_ids or sample.text:
            progress.token_ids.extend(sample.token_ids)
            chunk = router_pb2.TokenChunk(index=sample.index, token_ids=sample.token_ids,
                                          text=sample.text if include_text else "",
                                          logprobs=sample.logprobs, top_logprobs=sample.top_logprobs)
            responses.append(router_pb2.GenerateResponse(request_id=state.request_id, chunk=chunk))
        if sample.finish_reason:
            progress.finish_reason = sample.finish_reason
            responses.append(completion(state, sample.index))
    return responses


def completion(state: StreamState, index: int) -> router_pb2.GenerateResponse:
    """The Completion message for sample `index`."""
    progress = state.samples[index]
    return router_pb2.GenerateResponse(request_id=state.request_id, complete=router_pb2.Completion(
        index=index, finish_reason=progress.finish_reason or "abort", prompt_tokens=state.prompt_tokens,
        completion_tokens=len(progress.token_ids), cached_tokens=state.cached_tokens))
