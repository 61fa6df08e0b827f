"""Engine-side state of a request and of each of its n samples (sequences)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdserve.engine.prompt_logprobs import PromptLogprobs
from pdserve.engine.speculation import SpeculationPace
from pdserve.models.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.block_pool import KVBlock
    from pdserve.engine.stop_checker import StopChecker


class RequestStatus(enum.Enum):
    """Where a request is in the scheduler."""

    WAITING = "waiting"
    READY = "ready"  # holds its prompt's KV already (a prefilled request); waits for a sequence slot
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sample:
    """One sample of a request: its tokens, how many are in the KV cache, and its blocks.

    The sequence's tokens are prompt_token_ids + output_token_ids; the first num_computed_tokens
    of them have KV in block_table (position p lives in block_table[p // block_size]).
    block_hashes / prefix_uids describe the full blocks registered (or matched) in the prefix cache.
    num_draft_tokens: with a draft model speculating, how many of the sequence's first tokens have the draft's KV
    in the draft cache (the same block_table, the draft model's own cache tensors); speculation_pace: how many
    tokens it proposes next (pdserve.engine.speculation).
    pending_text: text of tokens generated elsewhere (before this engine continued the sample),
    handed out with the sample's next output. grammar: the state of the request's structured-output
    constraint after the sample's output tokens (pdserve.models.grammar), or None.
    """

    seq_id: int
    sample_index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[KVBlock] = field(default_factory=list)
    num_draft_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)
    prefix_uids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_checker: StopChecker | None = None
    pending_text: str = ""
    speculation_pace: SpeculationPace = field(default_factory=SpeculationPace)
    grammar: Any = None  # the structured-output constraint's state (llguidance.LLMatcher), or None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once the sample has a finish reason."""
        return self.finish_reason is not None

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    def reset_kv_state(self) -> None:
        """Forget everything about the KV cache (after its blocks were freed)."""
        self.num_computed_tokens = 0
        self.num_draft_tokens = 0
        self.block_table = []
        self.block_hashes = []
        self.prefix_uids = []


@dataclass(eq=False)
class Request:
    """A request: its prompt, params, resolved seed and n samples.

    Until the prompt is in the KV cache only one sample (the lead sample, the first unfinished one)
    runs; when its prompt is complete the other samples fork from it, sharing the prompt's
    blocks. After a preemption the same happens again (forked goes back to False).
    prompt_logprobs: the prompt's scores while the request computes them (None when it did not ask,
    on a request continued from another server, and once they went out in an output).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_index: int
    samples: list[Sample]
    status: RequestStatus = RequestStatus.WAITING
    forked: bool = False
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache at first admission
    num_expected_cached_tokens: int = 0  # what the prefix cache held of the prompt at arrival, last token excepted
    num_preemptions: int = 0
    num_speculative_proposed_tokens: int = 0  # over its samples, verified so far
    num_speculative_accepted_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)  # when the engine got it
    first_scheduled_time: float | None = None  # when it first joined the running batch
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def scores_prompt(self) -> bool:
        """True while prompt positions remain to be scored (no prefix-cache hits meanwhile)."""
        return self.prompt_logprobs is not None and self.prompt_logprobs.num_scored < len(self.prompt_token_ids) - 1

    @property
    def queue_time_s(self) -> float | None:
        """Seconds from arrival until first scheduled (None while still waiting)."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    def mark_scheduled(self) -> None:
        """Record the first time the request joins the running batch (later ones are ignored)."""
        if self.first_scheduled_time is None:
            self.first_scheduled_time = time.monotonic()

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_prompt_tokens_to_compute(self) -> int:
        """Prompt tokens this request still has to run through the model: all but what the prefix
        cache served (or, before admission, held at arrival) and what earlier chunks computed."""
        if self.status is RequestStatus.WAITING:  # an estimate (a preempted request recomputes more)
            return max(0, len(self.prompt_token_ids) - self.num_expected_cached_tokens)
        if self.forked:  # the prompt is in the cache: the samples share it
            return 0
        for sample in self.samples:  # the lead sample computes the prompt
            if not sample.is_finished:
                return max(0, len(self.prompt_token_ids) - sample.num_computed_tokens)
        return 0

    @property
    def live_samples(self) -> list[Sample]:
        """Samples that have not finished."""
        return [s for s in self.samples if not s.is_finished]

    @property
    def lead_sample(self) -> Sample:
        """The sample that computes the shared prompt (the first unfinished one)."""
        for sample in self.samples:
            if not sample.is_finished:
                return sample
        raise RuntimeError(f"request {self.request_id} has no unfinished sample")

    @property
    def fork_pending(self) -> bool:
        """True while the other live samples still wait for the lead sample's prompt blocks."""
        return not self.forked and len(self.live_samples) > 1

    @property
    def is_finished(self) -> bool:
        """True once every sample has finished."""
        return all(s.is_finished for s in self.samples)

    def active_samples(self) -> list[Sample]:
        """The samples the scheduler runs now: the lead sample alone while a fork is pending."""
        return [self.lead_sample] if self.fork_pending else self.live_samples

    def target_length(self, sample: Sample) -> int:
        """How far `sample` has tokens to compute: up to the prompt's end while a fork is
        pending (the others must share exactly the prompt's blocks), else all its tokens."""
        return self.num_prompt_tokens if self.fork_pending else sample.num_tokens
