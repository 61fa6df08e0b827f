"""Per-sample stop conditions and the text a sample may hand out so far.

Order of checks for each new token (vLLM semantics):
1. A stop token id, or an EOS id unless ignore_eos: finish "stop" (the token is kept in the
   token ids, its text is not added) -- once at least min_tokens tokens exist.
2. A stop string completed by the new text (matched on the detokenized text, so it may span
   token boundaries): finish "stop"; the text is cut before the stop string -- once at least
   min_tokens tokens exist.
3. A structured-output constraint complete with nothing allowed after it: finish "stop".
4. max_tokens reached: finish "length".
While a sample runs, text that could be the beginning of a stop string is held back until the
following tokens decide it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pdserve.models.sampling_params import SamplingParams


class Detokenizer(Protocol):
    """What the checker needs from pdserve.models.detokenizer.IncrementalDetokenizer."""

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text they complete."""

    def flush(self) -> str:
        """End the stream; return the text still held."""


@dataclass
class StopCheck:
    """The outcome of one token: the text released now and the finish reason, if finished."""

    text_delta: str
    finish_reason: str | None


class StopChecker:
    """Decides when a sample stops and which of its text is final."""

    def __init__(self, detokenizer: Detokenizer, params: SamplingParams,
                 eos_token_ids: Iterable[int]) -> None:
        self.detokenizer = detokenizer
        self.params = params
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.eos_token_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_strings = tuple(params.stop)
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""  # all text so far (cut at the stop string once one matched)
        self.num_emitted = 0  # characters of self.text already released
        self.num_tokens = 0

    def append(self, token_id: int, constraint_complete: bool = False) -> StopCheck:
        """Account for one new output token and say what to release and whether to stop;
        constraint_complete: the sample's structured-output constraint allows nothing after it."""
        self.num_tokens += 1
        may_stop = self.num_tokens >= self.params.min_tokens
        if may_stop and (token_id in self.stop_token_ids or token_id in self.eos_token_ids):
            self._add_text(self.detokenizer.flush(), may_stop)
            return self._finish("stop")
        if self._add_text(self.detokenizer.push([token_id]), may_stop):
            return self._finish("stop")
        if constraint_complete:
            self._add_text(self.detokenizer.flush(), may_stop)
            return self._finish("stop")
        if self.num_tokens >= self.params.max_tokens:
            matched = self._add_text(self.detokenizer.flush(), may_stop)
            return self._finish("stop" if matched else "length")
        return StopCheck(self._release(self._held_back_length()), None)

    def _add_text(self, delta: str, may_stop: bool) -> bool:
        """Append decoded text; when stopping is allowed and the text now contains a stop
        string past the released part, cut the text before it and return True."""
        if not delta:
            return False
        searched_from = max(self.num_emitted, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        if not self.stop_strings or not may_stop:
            return False
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop_strings) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def _finish(self, reason: str) -> StopCheck:
        return StopCheck(self._release(0), reason)

    def _release(self, held: int) -> str:
        """Hand out all unreleased text except the last `held` characters."""
        end = len(self.text) - held
        if end <= self.num_emitted:
            return ""
        delta = self.text[self.num_emitted:end]
        self.num_emitted = end
        return delta

    def _held_back_length(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        pending = len(self.text) - self.num_emitted
        if not pending or not self.stop_strings:
            return 0
        best = 0
        last_char = self.text[-1]
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, pending), best, -1):
                if stop[k - 1] == last_char and self.text.endswith(stop[:k]):
                    best = k
                    break
        return best
