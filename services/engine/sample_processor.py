"""Turns a step's logits into new tokens per sample: sampling rows, logprobs, stop checks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.engine.outputs import SampleOutput
from pdserve.engine.request import Request, Sample
from pdserve.engine.stop_checker import StopChecker
from pdserve.models.grammar import GrammarCompiler
from pdserve.models.sampler import Sampler, SamplingRow
from pdserve.models.sampling_params import SamplingParams

logger = logging.getLogger("pdserve.engine")


class _NoText:
    """Detokenizer stand-in for an engine without a tokenizer: token ids only, no text."""

    def push(self, ids: list[int]) -> str:
        """No text for any token."""
        return ""

    def flush(self) -> str:
        """No text held."""
        return ""


def make_stop_checker(tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                      eos_token_ids: Iterable[int]) -> StopChecker:
    """A StopChecker over a fresh incremental detokenizer for one sample."""
    if tokenizer is None:
        detokenizer = _NoText()
    else:
        from pdserve.models.detokenizer import IncrementalDetokenizer

        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_token_ids)
    return StopChecker(detokenizer, params, eos_token_ids)


@dataclass
class SamplingTarget:
    """What one chunk's logits rows are sampled for: every sample in `samples` draws from the chunk's
    (single) row (n samples of a fresh fork share it), or, with proposed_token_ids, the one sample draws
    its next 1 + len(proposed_token_ids) tokens from as many rows, verifying the proposals."""

    request: Request
    samples: list[Sample]
    proposed_token_ids: list[int] = field(default_factory=list)


@dataclass
class Verification:
    """The outcome of one speculative chunk: proposals made, and how many led the tokens drawn."""

    request: Request
    sample: Sample
    num_proposed: int
    num_accepted: int


class SampleProcessor:
    """Samples each target's tokens (verifying speculative proposals) and applies stop conditions.

    grammars: masks the rows of samples under a structured-output constraint (their Sample.grammar) and
    is told each drawn token; None for an engine without constraints."""

    def __init__(self, sampler: Sampler, grammars: GrammarCompiler | None = None) -> None:
        self.sampler = sampler
        self.grammars = grammars

    def sample(self, logits: torch.Tensor, targets: Sequence[SamplingTarget]
               ) -> tuple[list[tuple[Request, Sample, SampleOutput]], list[Verification]]:
        """logits: one row per target, or 1 + len(proposed_token_ids) rows for a speculative one, in
        target order. Appends the drawn tokens to the samples and returns each sample's delta
        (finish_reason set when it stopped) and each speculative chunk's verification.

        Row i of a speculative chunk is sampled as the sample's output position len(output) + i with the
        proposals before it as history, exactly as a step without speculation would have sampled it
        once those tokens were out; proposal i is accepted when it equals draw i and every proposal
        before it was accepted. The sample gets the accepted proposals and the first draw after them."""
        if not targets:
            return [], []
        expected = sum(1 + len(t.proposed_token_ids) for t in targets)
        if logits.shape[0] != expected:
            raise RuntimeError(f"runner returned {logits.shape[0]} logits rows, the targets need {expected}")
        row_of: list[int] = []
        rows: list[SamplingRow] = []
        constrained: list[tuple[int, Any]] = []  # (sampling row, its sample's grammar state)
        first_row: list[int] = []  # per target, its first sampling row
        next_logits_row = 0
        for target in targets:
            request, proposed = target.request, target.proposed_token_ids
            first_row.append(len(rows))
            if proposed:
                (sample,) = target.samples
                if sample.grammar is not None:
                    raise RuntimeError("a constrained sample was given speculative proposals")
                position = len(sample.output_token_ids)
                for i in range(len(proposed) + 1):
                    row_of.append(next_logits_row + i)
                    rows.append(SamplingRow(request.params, request.seed, sample.sample_index, position + i,
                                            request.prompt_token_ids, sample.output_token_ids + proposed[:i]))
                next_logits_row += len(proposed) + 1
                continue
            for sample in target.samples:
                if sample.grammar is not None:
                    constrained.append((len(rows), sample.grammar))
                row_of.append(next_logits_row)
                rows.append(SamplingRow(request.params, request.seed, sample.sample_index,
                                        len(sample.output_token_ids), request.prompt_token_ids,
                                        sample.output_token_ids))
            next_logits_row += 1
        if len(row_of) != logits.shape[0]:  # a fork's samples share a row
            logits = logits[torch.tensor(row_of, dtype=torch.int64, device=logits.device)]
        allowed = None
        if constrained:
            allowed = ([i for i, _ in constrained], self.grammars.fill_bitmask([g for _, g in constrained]))
        out = self.sampler(logits, rows, allowed)
        drawn = _Draws(out)
        results, verifications = [], []
        for target, start in zip(targets, first_row):
            request, proposed = target.request, target.proposed_token_ids
            if not proposed:
                for j, sample in enumerate(target.samples):
                    results.append((request, sample, self._emit(sample, request.params, drawn, [start + j])))
                continue
            (sample,) = target.samples
            accepted = 0
            while accepted < len(proposed) and proposed[accepted] == drawn.token_ids[start + accepted]:
                accepted += 1
            delta = self._emit(sample, request.params, drawn, list(range(start, start + accepted + 1)))
            # A stop among the accepted tokens ends the sample there: proposals after it were never emitted.
            verifications.append(Verification(request, sample, len(proposed), min(accepted, len(delta.token_ids))))
            results.append((request, sample, delta))
        return results, verifications

    def _emit(self, sample: Sample, params: SamplingParams, drawn: _Draws, rows: list[int]) -> SampleOutput:
        """Append the tokens of the given sampling rows to the sample, in order, until one stops it."""
        delta = SampleOutput(sample.sample_index)
        for row in rows:
            token_id = drawn.token_ids[row]
            sample.output_token_ids.append(token_id)
            check = sample.stop_checker.append(token_id, advance_grammar(sample.grammar, token_id))
            delta.token_ids.append(token_id)
            delta.text += sample.pending_text + check.text_delta
            sample.pending_text = ""
            if params.logprobs is not None:
                k = params.logprobs
                delta.logprobs = (delta.logprobs or []) + [drawn.logprobs[row]]
                top = (list(zip(drawn.top_ids[row][:k], drawn.top_values[row][:k]))
                       if k and drawn.top_ids is not None else [])
                delta.top_logprobs = (delta.top_logprobs or []) + [top]
            if check.finish_reason is not None:
                sample.finish_reason = delta.finish_reason = check.finish_reason
                break
        return delta


def advance_grammar(grammar: Any, token_id: int) -> bool:
    """Tell a sample's constraint state (None: unconstrained) its next token; True when the constraint is
    complete with nothing allowed after it (the sample then stops). A token the constraint refuses cannot come
    from a masked draw (a continued sample's tokens are checked first, see prefilled.py), but a grammar that
    ran past llguidance's parser limits refuses every token: either way the sample ends."""
    if grammar is None:
        return False
    if not grammar.consume_token(token_id):
        # (Not the matcher's error text: it quotes the client's grammar, which stays out of the logs.)
        logger.warning("token %d refused by a structured-output constraint (or its parser limits); "
                       "the sample ends there", token_id)
        return True
    return grammar.is_stopped()


class _Draws:
    """A SamplerOutput as Python lists (one .tolist() per tensor)."""

    def __init__(self, out) -> None:
        self.token_ids = out.token_ids.tolist()
        self.logprobs = out.logprobs.tolist()
        self.top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        self.top_values = out.top_logprobs.tolist() if out.top_logprobs is not None else None
