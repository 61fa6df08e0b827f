"""Repetition, frequency and presence penalties, and the min_tokens stop-token mask.

Penalties follow vLLM / OpenAI semantics, applied in this order to the raw logits:
- repetition_penalty r (HF, CTRL paper) over every token seen in the prompt or the output:
  a positive logit is divided by r, a negative one multiplied by r;
- frequency_penalty f: logit -= f * (times the token occurs in the output);
- presence_penalty q: logit -= q if the token occurs in the output at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

_NEG_INF = float("-inf")


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str, what: str
) -> torch.Tensor:
    """[R, V] float32: how often each token id occurs in each row's list.

    Raises ValueError naming `what` when an id is outside [0, vocab_size)."""
    rows = len(token_ids)
    counts = torch.zeros(rows * vocab_size, dtype=torch.float32, device=device)
    lengths = [len(ids) for ids in token_ids]
    if sum(lengths) == 0:
        return counts.view(rows, vocab_size)
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64)
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{what} token id {bad} is outside the vocabulary [0, {vocab_size})")
    row_of_token = torch.repeat_interleave(torch.arange(rows), torch.tensor(lengths))
    flat = (flat + row_of_token * vocab_size).to(device)
    counts.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=device))
    return counts.view(rows, vocab_size)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
) -> torch.Tensor:
    """Return penalized copies of `logits` ([R, V] float32).

    prompt_token_ids / output_token_ids: R token lists each. The three penalties are [R]
    float32 tensors (1.0 / 0.0 / 0.0 mean no penalty)."""
    rows, vocab_size = logits.shape
    if len(prompt_token_ids) != rows or len(output_token_ids) != rows:
        raise ValueError(
            f"need {rows} prompt and output token lists, got "
            f"{len(prompt_token_ids)} and {len(output_token_ids)}"
        )
    device = logits.device
    output_counts = token_counts(output_token_ids, vocab_size, device, "output")
    in_output = output_counts > 0
    seen = token_counts(prompt_token_ids, vocab_size, device, "prompt") > 0
    seen |= in_output

    rep = repetition_penalty.to(device=device, dtype=torch.float32)[:, None]
    factor = torch.where(seen, rep, torch.ones_like(rep))
    penalized = torch.where(logits > 0, logits / factor, logits * factor)
    penalized -= frequency_penalty.to(device=device, dtype=torch.float32)[:, None] * output_counts
    penalized -= presence_penalty.to(device=device, dtype=torch.float32)[:, None] * in_output
    return penalized


def mask_tokens(logits: torch.Tensor, row_token_pairs: Sequence[tuple[int, int]]) -> None:
    """Set logits[row, token] = -inf in place for each (row, token) pair; pairs whose token id
    is outside the vocabulary are skipped (such a token can never be sampled anyway)."""
    vocab_size = logits.shape[1]
    pairs = [(r, t) for r, t in row_token_pairs if 0 <= t < vocab_size]
    if not pairs:
        return
    index = torch.tensor(pairs, dtype=torch.int64, device=logits.device)
    logits[index[:, 0], index[:, 1]] = _NEG_INF
