"""Checks a new request must pass before the engine accepts it (so it can always finish)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from pdserve.models.sampling_params import SamplingParams


class RequestRejectedError(ValueError):
    """A request the engine can never serve; the message says which limit it breaks."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens positions."""
    return -(-num_tokens // block_size)


def worst_case_blocks(prompt_len: int, params: SamplingParams, block_size: int) -> int:
    """Most blocks a request can hold at once: the prompt's full blocks (shared by the n
    samples) plus, per sample, every block from the first one it writes into to its last."""
    total_len = prompt_len + params.max_tokens
    shared = prompt_len // block_size
    per_sample = blocks_for(total_len, block_size) - shared
    return shared + params.n * per_sample


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int | None,
    max_model_len: int,
    max_num_seqs: int,
    num_blocks: int,
    block_size: int,
    can_detokenize: bool,
) -> None:
    """Raise RequestRejectedError when the request is malformed or can never fit the engine."""
    if not isinstance(params, SamplingParams):
        raise RequestRejectedError(f"params must be SamplingParams, got {type(params).__name__}")
    if len(prompt_token_ids) == 0:
        raise RequestRejectedError("the prompt is empty: at least one token is needed")
    limit = vocab_size if vocab_size is not None else float("inf")
    for i, token in enumerate(prompt_token_ids):
        if not isinstance(token, numbers.Integral) or not 0 <= token < limit:
            raise RequestRejectedError(
                f"prompt token {i} is {token!r}: token ids must be ints in [0, {limit})")
    bad_bias = next((t for t, _ in params.logit_bias if t >= limit), None)
    if bad_bias is not None:
        raise RequestRejectedError(f"logit_bias token id {bad_bias} is outside the vocabulary [0, {limit})")
    total = len(prompt_token_ids) + params.max_tokens
    if total > max_model_len:
        raise RequestRejectedError(
            f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
            f"exceeds max_model_len {max_model_len}")
    if params.n > max_num_seqs:
        raise RequestRejectedError(f"n={params.n} exceeds max_num_seqs {max_num_seqs}")
    needed = worst_case_blocks(len(prompt_token_ids), params, block_size)
    if needed > num_blocks:
        raise RequestRejectedError(
            f"the request may need {needed} KV blocks but the engine has {num_blocks}")
    if params.stop and not can_detokenize:
        raise RequestRejectedError("stop strings need a tokenizer, and this engine has none")
