"""What the engine hands back: per-step deltas (RequestOutput) and finished results."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.prompt_logprobs import PromptLogprobs


@dataclass
class SampleOutput:
    """What one sample produced in one step.

    token_ids: new token ids; text: new text (held-back stop-string candidates excluded);
    logprobs: raw logprob of each new token (None unless params.logprobs is set);
    top_logprobs: per new token, the top params.logprobs (token id, logprob) pairs;
    finish_reason: "stop" | "length" | "abort" once the sample has finished.
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None

    def merge(self, delta: SampleOutput) -> None:
        """Append a later delta of the same sample (tokens, text, logprobs, finish reason)."""
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + delta.top_logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


@dataclass
class RequestOutput:
    """A request's progress in one step: the samples that progressed (or finished).

    prompt_tokens: prompt length; cached_tokens: prompt tokens served from the prefix cache;
    finished: every sample has finished (the last output of the request);
    queue_time_s: seconds the request waited in this engine's queue before it was first
    scheduled (None on outputs of a request never scheduled here, e.g. aborted while waiting);
    speculative_proposed_tokens / speculative_accepted_tokens: the request's speculative proposals verified so
    far and those accepted (over its samples, on this engine);
    prompt_logprobs: the prompt's scores, once, in the output of the step that finished the prompt
    (for a request that asked for them).
    """

    request_id: str
    samples: list[SampleOutput]
    prompt_tokens: int
    cached_tokens: int
    finished: bool
    queue_time_s: float | None = None
    speculative_proposed_tokens: int = 0
    speculative_accepted_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class GenerationResult:
    """A finished request's whole output, samples in index order (each SampleOutput holds the
    sample's tokens and text so far)."""

    request_id: str
    prompt_token_ids: list[int]
    samples: list[SampleOutput]
    cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None

    def add(self, output: RequestOutput) -> None:
        """Fold one step's output into the result."""
        self.cached_tokens = output.cached_tokens
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        for delta in output.samples:
            self.samples[delta.index].merge(delta)
