"""Draft-model proposals: a small checkpoint with the target's tokenizer proposes each sample's next K tokens.

The draft model has its own paged KV cache (a ModelRunner of as many blocks as the target's, same block size)
addressed by the target's block tables: a sample's blocks hold the target's KV in the target cache and the
draft's KV in the draft cache, so allocation, trimming and freeing cover both, and no block of either cache can
outlive its sample. Copy-on-write copies need no twin in the draft cache: a block is copied when a sample writes
into a block it shares (the partial last block of a fresh fork, whose samples have no draft KV yet); full blocks
shared through the prefix cache are never written again. Sample.num_draft_tokens says how many of the sample's
first tokens have draft KV. Each speculating step, after the scheduler has allocated blocks for the sample's last
token and K proposals, the draft runs K batched forwards: the first computes the tokens it has not seen (the
prompt the prefill server computed, tokens decoded while speculation was off, the last token) and draws proposal
1, each later one feeds the previous proposal and draws the next. Draws use the target's sampler with the
target's seeded noise of the same output position, so where the draft's distribution is close to the target's,
the proposal is the token the target will draw (at temperature 0 and above). After verification the draft keeps
the KV of the accepted proposals (the last proposal is never fed, so never more than K - 1).

Preemption frees a sample's blocks and resets num_draft_tokens; a draft cache entry of a block reused by
another sample is never read, since a sample reads only positions below its own num_draft_tokens. Draft
KV only ever shapes proposals: verification makes every emitted token the target's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.model_runner import ModelRunner, ScheduledChunk
from pdserve.engine.request import Sample
from pdserve.engine.scheduler import ScheduledSample
from pdserve.engine.speculation import Proposer
from pdserve.models.sampler import Sampler, SamplingRow

PLACEHOLDER_TOKEN_ID = 0  # stands for a proposal until the draft computes it (never reaches the target)
STAND_IN_TOKEN_ID = 0  # what the draft is shown for an id past its vocabulary


class DraftProposer(Proposer):
    """Proposals from a draft model over its own paged KV cache (see the module doc).

    runner: the draft model's ModelRunner (see check_draft_runner); sampler: the engine's sampler (the same
    seeded draws); vocab_size: the model's vocabulary (draft logits are cut or padded with -inf to it; ids past
    a smaller draft vocabulary are shown to the draft as id 0: its proposals there are merely guesses);
    max_tokens_per_forward: the most tokens one draft forward computes (a long catch-up, such as a prompt
    the prefill server computed, is split into forwards of at most this many tokens).
    """

    def __init__(self, runner: ModelRunner, sampler: Sampler, vocab_size: int, max_tokens_per_forward: int) -> None:
        if max_tokens_per_forward < 1:
            raise ValueError(f"max_tokens_per_forward must be >= 1, got {max_tokens_per_forward}")
        self.runner = runner
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.draft_vocab_size = runner.config.vocab_size
        self.max_tokens_per_forward = max_tokens_per_forward

    def propose(self, sample: Sample, max_tokens: int) -> list[int]:
        """max_tokens placeholders: complete() computes the proposals once their blocks are allocated."""
        return [PLACEHOLDER_TOKEN_ID] * max_tokens

    def complete(self, scheduled: Sequence[ScheduledSample]) -> None:
        """Replace the placeholder proposals of the step's speculating samples with the draft's draws."""
        jobs = [s for s in scheduled if s.proposed_token_ids]
        if not jobs:
            return
        tables = [[b.block_id for b in s.sample.block_table] for s in jobs]
        starts = self._catch_up(jobs, tables)
        drafted: list[list[int]] = [[] for _ in jobs]
        active = list(range(len(jobs)))
        for k in range(max(len(s.proposed_token_ids) for s in jobs)):
            if k == 0:  # what the draft has not seen of each sample, its last token included
                chunks = [ScheduledChunk(s.sample.seq_id, self._ids(s.sample.token_slice(start, s.sample.num_tokens)),
                                         start, table, needs_logits=True)
                          for s, start, table in zip(jobs, starts, tables)]
            else:
                active = [i for i in active if len(jobs[i].proposed_token_ids) > k]
                chunks = [ScheduledChunk(jobs[i].sample.seq_id, [drafted[i][-1]], jobs[i].sample.num_tokens + k - 1,
                                         tables[i], needs_logits=True) for i in active]
            logits = self.runner.execute(chunks)
            if logits.shape[1] != self.vocab_size:  # draws must be ids of the model's vocabulary
                logits = (logits[:, :self.vocab_size] if logits.shape[1] > self.vocab_size else
                          torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[1]), value=float("-inf")))
            rows = [self._row(jobs[i], drafted[i]) for i in active]
            for i, token_id in zip(active, self.sampler(logits, rows).token_ids.tolist()):
                drafted[i].append(token_id)
        for s, tokens in zip(jobs, drafted):
            s.proposed_token_ids[:] = tokens
            # The draft computed every token but its last proposal.
            s.sample.num_draft_tokens = s.sample.num_tokens + len(tokens) - 1

    def _catch_up(self, jobs: Sequence[ScheduledSample], tables: list[list[int]]) -> list[int]:
        """Compute, in forwards of at most max_tokens_per_forward tokens, what the draft has not seen of the
        samples while the first drawing forward would be larger than that; returns where each sample's
        first drawing chunk starts."""
        starts = [min(s.sample.num_draft_tokens, s.sample.num_tokens - 1) for s in jobs]
        while sum(s.sample.num_tokens - start for s, start in zip(jobs, starts)) > self.max_tokens_per_forward:
            room, chunks = self.max_tokens_per_forward, []
            for i, s in enumerate(jobs):
                take = min(s.sample.num_tokens - 1 - starts[i], room)
                if take > 0:
                    token_ids = self._ids(s.sample.token_slice(starts[i], starts[i] + take))
                    chunks.append(ScheduledChunk(s.sample.seq_id, token_ids, starts[i], tables[i], needs_logits=False))
                    starts[i] += take
                    room -= take
            if not chunks:  # only last tokens are left: the drawing forward takes them
                break
            self.runner.execute(chunks)
        return starts

    def _ids(self, token_ids: list[int]) -> list[int]:
        """token_ids as the draft's embedding can take them (ids past its vocabulary become 0)."""
        if self.draft_vocab_size >= self.vocab_size:
            return token_ids
        return [t if t < self.draft_vocab_size else STAND_IN_TOKEN_ID for t in token_ids]

    @staticmethod
    def _row(s: ScheduledSample, drafted: list[int]) -> SamplingRow:
        """The sampling row of the sample's next drafted token: the position the target will sample it at."""
        request, sample = s.request, s.sample
        return SamplingRow(request.params, request.seed, sample.sample_index,
                           len(sample.output_token_ids) + len(drafted), request.prompt_token_ids,
                           sample.output_token_ids + drafted)


def check_draft_runner(draft: ModelRunner, num_blocks: int, block_size: int, max_model_len: int) -> None:
    """Raise ValueError when a draft runner cannot serve an engine of num_blocks blocks of block_size tokens
    and sequences of up to max_model_len tokens."""
    if draft.block_size != block_size or draft.num_blocks < num_blocks:
        raise ValueError(f"the draft model's KV cache ({draft.num_blocks} blocks of {draft.block_size} tokens) "
                         f"must cover the engine's ({num_blocks} blocks of {block_size})")
    if draft.config.max_position_embeddings < max_model_len:
        raise ValueError(f"the draft model takes {draft.config.max_position_embeddings} positions, fewer than the "
                         f"engine's max model length {max_model_len} (lower --max-model-len)")
