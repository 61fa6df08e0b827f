"""Speculative decoding: cheap proposals of a sample's next tokens, verified in one forward.

A decode step normally computes one token per sample. With speculation the step computes the sample's last
token and K proposed tokens as one chunk (the packed varlen path prompts use), and the K + 1 logits rows are
sampled as the samples would have been one step at a time: row i draws token i with the sampler's seeded
Gumbel noise of (seed, sample, output position), penalties seeing proposals 0..i-1 as history. Proposals are
accepted while they equal what was drawn; the first that differs is replaced by the drawn token (or, when all
K are accepted, the draw after them is the bonus token). Every emitted token is therefore exactly the token
the sample would have had without speculation, at any temperature: greedy tokens are the target's, the
distribution is the target's, and failover or resume on a server with or without speculation continues with
the same tokens. (For a deterministic proposal this accepts with probability p(proposal), as rejection
sampling does.) The KV of rejected proposals stays in slots beyond the sample's computed tokens, to be
overwritten; blocks allocated only for them go back to the pool, and only blocks of accepted tokens enter the
prefix cache.

Proposers: n-gram prompt lookup (match the last n tokens earlier in the prompt and output, propose what
followed), and a draft model (pdserve.engine.draft_proposer: a small checkpoint with the target's tokenizer, run
K times per step over its own paged cache; its draws use the same seeded noise, so a draft close to the target
proposes what the target draws at any temperature). Speculation is off in a step whose batch has more than
max_batch_seqs running samples: a large batch is compute-bound, and verifying K tokens per sample then costs
more than the steps it saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pdserve.engine.request import Sample
    from pdserve.engine.scheduler import ScheduledSample

SPECULATIVE_METHODS = ("none", "ngram", "draft")
# Speculate only in steps of at most this many running samples: the crossovers `pdserve bench speculative` measured
# on 2 CPU cores (services/bench/RESULTS.md). Prompt lookup costs nothing to propose and pays to batch 4-8 where it
# is right; a draft costs K forwards per step and paid only at batch 1 unless right every time.
DEFAULT_MAX_BATCH_SEQS = {"ngram": 4, "draft": 1}


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup) or "draft" (a draft model); num_speculative_tokens: K proposed per sample
    and step; max_batch_seqs: speculate only in steps with at most this many running samples (None: the
    method's DEFAULT_MAX_BATCH_SEQS);
    ngram_max / ngram_min: the longest and shortest suffix matched (the longest that occurs wins);
    draft_model: the draft checkpoint (directory, GGUF file or Hub id) for method "draft"."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    max_batch_seqs: int | None = None
    ngram_max: int = 4
    ngram_min: int = 2
    draft_model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS[1:]:
            raise ValueError(f"speculative method must be one of {SPECULATIVE_METHODS[1:]}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"--num-speculative-tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if self.max_batch_seqs is None:
            object.__setattr__(self, "max_batch_seqs", DEFAULT_MAX_BATCH_SEQS[self.method])
        if self.max_batch_seqs < 1:
            raise ValueError(f"--speculative-max-batch must be >= 1, got {self.max_batch_seqs}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.ngram_min}, {self.ngram_max}")
        if (self.method == "draft") != bool(self.draft_model):
            raise ValueError("--speculative draft needs --draft-model (a checkpoint with the model's tokenizer), "
                             "and --draft-model needs --speculative draft")


MAX_BACKOFF_STEPS = 32


@dataclass
class SpeculationPace:
    """How much one sample speculates, from how its recent proposals fared (proposals cost a verification
    each; a workload the proposer cannot predict must not pay for them every step).

    length: proposals to make next (at most num_speculative_tokens): one more than were accepted last time, or
    twice as many as last time when all were accepted (a draft that missed one token is usually right again at
    once). After a chunk with nothing accepted the sample sits out its next 2, 4, 8 .. (at most MAX_BACKOFF_STEPS)
    chances to speculate (decode steps of a speculating engine) before proposing one token again (a proposer
    wrong on a stretch of text is usually wrong at the next token too); any acceptance ends the back-off."""

    length: int | None = None  # None: num_speculative_tokens
    misses: int = 0
    skip_steps: int = 0

    def limit(self, num_speculative_tokens: int) -> int:
        """Proposals to make this step (0 while backing off; a call per decode step that could speculate)."""
        if self.skip_steps > 0:
            self.skip_steps -= 1
            return 0
        return num_speculative_tokens if self.length is None else min(self.length, num_speculative_tokens)

    def record(self, num_proposed: int, num_accepted: int, num_speculative_tokens: int) -> None:
        """Update after a verification of num_proposed proposals of which num_accepted led."""
        if num_accepted == 0:
            self.misses += 1
            self.skip_steps = min(2 ** self.misses, MAX_BACKOFF_STEPS)
            self.length = 1
            return
        self.misses = 0
        if num_accepted == num_proposed:  # the step's budget or max_tokens may have cut the proposals: not a miss
            grown = max(2 * num_proposed, self.length or num_speculative_tokens)
        else:
            grown = num_accepted + 1
        self.length = min(grown, num_speculative_tokens)


class Proposer:
    """What the engine asks for proposals. The scheduler calls propose() for each sample about to decode one
    token (how many, and which when they are known then); once the step's blocks are allocated, complete()
    may fill in proposals computed over them."""

    def propose(self, sample: Sample, max_tokens: int) -> list[int]:
        """Up to max_tokens proposed continuations of the sample's tokens (prompt + output so far)."""
        raise NotImplementedError

    def complete(self, scheduled: Sequence[ScheduledSample]) -> None:
        """Fill in the step's proposals in place (their number fixed); nothing to do for most proposers."""


class NgramProposer(Proposer):
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the sequence's last n
    tokens, for the largest n in [ngram_min, ngram_max] that occurs."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, sample: Sample, max_tokens: int) -> list[int]:
        """Up to max_tokens proposed continuations of the sample's prompt + output (see lookup)."""
        return self.lookup(sample.prompt_token_ids + sample.output_token_ids, max_tokens)

    def lookup(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens proposed continuations of token_ids; [] when no suffix of it occurs earlier."""
        if max_tokens <= 0 or len(token_ids) < 2:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.config.ngram_max, length - 1), self.config.ngram_min - 1, -1):
            suffix = tokens[length - n:]
            # Start positions i < length - n where tokens[i:i + n] == suffix (the suffix itself excluded).
            candidates = np.flatnonzero(tokens[:length - n] == suffix[0])
            for offset in range(1, n):
                candidates = candidates[tokens[candidates + offset] == suffix[offset]]
                if candidates.size == 0:
                    break
            if candidates.size:
                start = int(candidates[-1]) + n
                return tokens[start:start + max_tokens].tolist()
        return []
