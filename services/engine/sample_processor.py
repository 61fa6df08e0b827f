"""Turns a step's logits into new tokens per sample: sampling rows, logprobs, stop checks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from pdserve.engine.outputs import SampleOutput
from pdserve.engine.request import Request, Sample
from pdserve.engine.stop_checker import StopChecker
from pdserve.models.sampler import Sampler, SamplingRow
from pdserve.models.sampling_params import SamplingParams


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


class SampleProcessor:
    """Samples one token per target sample and applies its stop conditions."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def sample(self, logits: torch.Tensor, targets: Sequence[tuple[Request, list[Sample]]]
               ) -> list[tuple[Request, Sample, SampleOutput]]:
        """logits: [len(targets), V], row i for targets[i]; every sample of targets[i] draws a
        token from row i (n samples of a fresh fork share one row). Appends the tokens to the
        samples and returns each sample's delta (finish_reason set when it stopped)."""
        if not targets:
            return []
        if logits.shape[0] != len(targets):
            raise RuntimeError(f"runner returned {logits.shape[0]} logits rows for {len(targets)} chunks")
        row_of: list[int] = []
        rows: list[SamplingRow] = []
        owners: list[tuple[Request, Sample]] = []
        for i, (request, samples) in enumerate(targets):
            for sample in samples:
                row_of.append(i)
                rows.append(SamplingRow(request.params, request.seed, sample.sample_index,
                                        len(sample.output_token_ids), request.prompt_token_ids,
                                        sample.output_token_ids))
                owners.append((request, sample))
        if len(row_of) != len(targets):
            logits = logits[torch.tensor(row_of, dtype=torch.int64, device=logits.device)]
        out = self.sampler(logits, rows)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_values = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        results = []
        for j, (request, sample) in enumerate(owners):
            delta = self._apply(sample, token_ids[j], request.params)
            if request.params.logprobs is not None:
                k = request.params.logprobs
                delta.logprobs = [logprobs[j]]
                top = list(zip(top_ids[j][:k], top_values[j][:k])) if k and top_ids is not None else []
                delta.top_logprobs = [top]
            results.append((request, sample, delta))
        return results

    @staticmethod
    def _apply(sample: Sample, token_id: int, params: SamplingParams) -> SampleOutput:
        sample.output_token_ids.append(token_id)
        check = sample.stop_checker.append(token_id)
        if check.finish_reason is not None:
            sample.finish_reason = check.finish_reason
        text, sample.pending_text = sample.pending_text + check.text_delta, ""
        return SampleOutput(sample.sample_index, [token_id], text, finish_reason=check.finish_reason)
