"""Worker outputs (pdserve.v1.RequestOutput) into the public GenerateResponse stream.

Every chunk sent to the client carries its tokens together with the text they release, so a
client holding a sample's first c tokens holds exactly the text released through token c. A
worker that continues a sample (a Decode after a prefill, a retry after a failure, a resume
after a router restart) restates the sample's text from its first character in its first
output; the router drops the characters, and any re-generated tokens, the client already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.v1 import router_pb2, worker_pb2


@dataclass
class SampleProgressState:
    """What the client has been sent for one sample, and what to drop from a continuing worker's
    stream: skip_tokens tokens it re-generates, skip_chars characters of text it restates."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text_chars: int = 0
    skip_tokens: int = 0
    skip_chars: int = 0

    def expect_restated_text(self) -> None:
        """The next worker continues this sample from its tokens and restates its text."""
        self.skip_chars = self.text_chars


@dataclass
class StreamState:
    """Per-request relay state: samples' progress, prompt and cached token counts, and the
    identity of the client the request belongs to (pdserve.router.identity)."""

    request_id: str
    prompt_tokens: int
    samples: list[SampleProgressState]
    cached_tokens: int = 0
    abort_requested: bool = False
    prompt_logprobs_sent: bool = False
    owner: str = ""
    route: dict[str, str | int] = field(default_factory=dict)  # the last routing decisions, as span attributes

    @property
    def finished(self) -> bool:
        """Every sample has its finish reason."""
        return all(s.finish_reason is not None for s in self.samples)

    @property
    def started(self) -> bool:
        """Some sample has tokens (continuing needs them as context) or has finished."""
        return any(s.token_ids or s.finish_reason is not None for s in self.samples)


def responses_for(state: StreamState, output: worker_pb2.RequestOutput) -> list[router_pb2.GenerateResponse]:
    """Turn one worker output into client responses (the prompt's scores the first time a worker
    sends them, a chunk per sample that progressed, then a completion per sample that finished),
    updating `state`."""
    state.cached_tokens = max(state.cached_tokens, output.cached_tokens)
    responses = []
    if output.HasField("prompt_logprobs") and not state.prompt_logprobs_sent:
        # Once, before any chunk: a retried prefill scores the prompt again.
        state.prompt_logprobs_sent = True
        responses.append(router_pb2.GenerateResponse(request_id=state.request_id,
                                                     prompt_logprobs=output.prompt_logprobs))
    for sample in output.samples:
        progress = state.samples[sample.index]
        if progress.finish_reason is not None:
            continue
        chunk = _new_part(progress, sample)
        if chunk is not None:
            responses.append(router_pb2.GenerateResponse(request_id=state.request_id, chunk=chunk))
        if sample.finish_reason:
            progress.finish_reason = sample.finish_reason
            responses.append(completion(state, sample.index))
    return responses


def _new_part(progress: SampleProgressState, sample: worker_pb2.SampleOutput) -> router_pb2.TokenChunk | None:
    """The part of `sample` the client does not have yet, as a chunk (None when nothing)."""
    text = sample.text
    if progress.skip_chars:
        cut = min(progress.skip_chars, len(text))
        text, progress.skip_chars = text[cut:], progress.skip_chars - cut
    token_ids = list(sample.token_ids)
    logprobs, top_logprobs = list(sample.logprobs), list(sample.top_logprobs)
    if progress.skip_tokens and token_ids:
        # Re-generated tokens the client holds, with the text they release (it holds that too):
        # not sent again, but from now on part of what the client has.
        drop = min(progress.skip_tokens, len(token_ids))
        progress.skip_tokens -= drop
        progress.token_ids.extend(token_ids[:drop])
        progress.text_chars += len(text)
        token_ids, logprobs, top_logprobs = token_ids[drop:], logprobs[drop:], top_logprobs[drop:]
        if not token_ids:
            return None
        text = ""  # a chunk straddling the skip: its text is the dropped tokens' (one token a step)
    if not token_ids and not text:
        return None
    progress.token_ids.extend(token_ids)
    progress.text_chars += len(text)
    return router_pb2.TokenChunk(index=sample.index, token_ids=token_ids, text=text,
                                 logprobs=logprobs, top_logprobs=top_logprobs)


def completion(state: StreamState, index: int) -> router_pb2.GenerateResponse:
    """The Completion message for sample `index`."""
    progress = state.samples[index]
    return router_pb2.GenerateResponse(request_id=state.request_id, complete=router_pb2.Completion(
        index=index, finish_reason=progress.finish_reason or "abort", prompt_tokens=state.prompt_tokens,
        completion_tokens=len(progress.token_ids), cached_tokens=state.cached_tokens))
