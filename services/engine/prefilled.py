"""Continuing a request that another server started: checks, stop-checker priming, prompt KV.

A decode server continues a request after prefill (its prompt KV arrived in reserved blocks,
each sample has its first token) or after a failed server (no KV: prompt + generated tokens are
recomputed). Either way each continued sample's generated tokens count as output already:
seeded sampling continues at output position len(generated), max_tokens / min_tokens / stop
conditions count them, and their text goes out with the sample's first output on this engine.

For the prefill side: first_token_params() are the params to run a request with so that it
stops after its first token, drawn exactly as in a full run, and finish_reason_after() says
whether that token really finished a sample under the request's own params.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.engine.block_pool import KVBlock
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.outputs import SampleOutput
from pdserve.engine.request import Request
from pdserve.engine.reservations import BlockReservation
from pdserve.engine.sample_processor import advance_grammar, make_stop_checker
from pdserve.engine.validation import RequestRejectedError
from pdserve.models.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine


def first_token_params(params: SamplingParams) -> SamplingParams:
    """params for a run that ends after the first token: max_tokens 1, and min_tokens capped at
    1 so that the first token's stop/EOS masking is that of the full request."""
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))


def finish_reason_after(engine: LLMEngine, prompt_token_ids: Sequence[int], params: SamplingParams,
                        generated: Sequence[int]) -> str | None:
    """The finish reason ("stop" | "length") a sample of a request with `params` has once it has
    produced `generated`, or None when it goes on. Reads only the engine's tokenizer and EOS
    ids, so any thread may call it."""
    return outcome_after(engine, prompt_token_ids, params, generated)[0]


def outcome_after(engine: LLMEngine, prompt_token_ids: Sequence[int], params: SamplingParams,
                  generated: Sequence[int]) -> tuple[str | None, str]:
    """(finish reason or None, the text released) of a sample of a request with `params` once it
    has produced `generated`: the text a stream of that sample has sent through its last token
    (text that may still start a stop string, or an incomplete character, is held back)."""
    checker = make_stop_checker(engine.tokenizer, list(prompt_token_ids), params, engine.eos_token_ids)
    grammar = engine.grammars.matcher(params.structured) if params.structured is not None else None
    text = []
    for token in generated:
        check = checker.append(int(token), advance_grammar(grammar, int(token)))
        text.append(check.text_delta)
        if check.finish_reason is not None:
            return check.finish_reason, "".join(text)
    return None, "".join(text)


def check_progress(prompt_token_ids: Sequence[int], params: SamplingParams, generated: Sequence[Sequence[int]],
                   sample_indices: Sequence[int] | None, cached_tokens: int, vocab_size: int | None,
                   reservation: BlockReservation | None) -> list[int]:
    """Validate the continued samples' progress; returns their sample indices.

    generated[k]: tokens already produced by sample sample_indices[k] (default: k). Raises
    RequestRejectedError (a ValueError) naming what is wrong.
    """
    prompt_len = len(prompt_token_ids)
    if not isinstance(cached_tokens, numbers.Integral) or not 0 <= cached_tokens <= prompt_len:
        raise RequestRejectedError(f"cached_tokens {cached_tokens!r} is not in [0, prompt length {prompt_len}]")
    if len(generated) == 0:
        raise RequestRejectedError("generated lists no sample: at least one sample must continue")
    indices = list(range(len(generated))) if sample_indices is None else list(sample_indices)
    if len(indices) != len(generated):
        raise RequestRejectedError(f"{len(indices)} sample indices for {len(generated)} generated lists")
    for i in indices:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool) or not 0 <= i < params.n:
            raise RequestRejectedError(f"sample index {i!r} is not in [0, n={params.n})")
    if len(set(indices)) != len(indices):
        raise RequestRejectedError(f"sample indices {indices} repeat a sample")
    lengths = [len(tokens) for tokens in generated]
    if 0 in lengths and max(lengths) > 0:
        raise RequestRejectedError("either every continued sample has generated tokens or none has")
    if max(lengths) > params.max_tokens:
        raise RequestRejectedError(
            f"a sample has {max(lengths)} generated tokens, more than max_tokens {params.max_tokens}")
    limit = vocab_size if vocab_size is not None else float("inf")
    for k, tokens in zip(indices, generated):
        for token in tokens:
            if not isinstance(token, numbers.Integral) or not 0 <= token < limit:
                raise RequestRejectedError(
                    f"sample {k}: generated token {token!r} is not a token id in [0, {limit})")
    if reservation is not None:
        if 0 in lengths:
            raise RequestRejectedError("a sample continued from prefilled KV needs its first token")
        if reservation.num_prompt_tokens != prompt_len:
            raise RequestRejectedError(
                f"reservation {reservation.reservation_id!r} holds KV for {reservation.num_prompt_tokens} "
                f"prompt tokens, the request's prompt has {prompt_len}")
        held = reservation.held_tokens
        if held and tuple(int(t) for t in prompt_token_ids[:len(held)]) != held:
            raise RequestRejectedError(
                f"reservation {reservation.reservation_id!r} holds cached KV for other leading tokens than "
                f"the request's prompt")
    return [int(i) for i in indices]


def prime_samples(request: Request, generated: Sequence[Sequence[int]]) -> list[SampleOutput]:
    """Feed each sample's generated tokens through its stop checker, as if it had sampled them.

    request.samples[k] continues generated[k]. The text the tokens release waits in the
    sample's pending_text for its next output. A sample that the tokens already finish (a stop
    string in their text, a stop/EOS token, max_tokens, its constraint complete) finishes now: its
    final output (no new token ids, the text up to the stop) is returned. Tokens that leave the
    request's structured-output constraint are refused (RequestRejectedError).
    """
    finished = []
    for sample, tokens in zip(request.samples, generated):
        for token in tokens:
            token = int(token)
            if sample.grammar is not None and not sample.grammar.validate_tokens([token]):
                raise RequestRejectedError(f"sample {sample.sample_index}: generated token {token} is outside the "
                                           "request's structured-output constraint")
            sample.output_token_ids.append(token)
            check = sample.stop_checker.append(token, advance_grammar(sample.grammar, token))
            sample.pending_text += check.text_delta
            if check.finish_reason is not None:
                sample.finish_reason = check.finish_reason
                finished.append(SampleOutput(sample.sample_index, [], sample.pending_text,
                                             finish_reason=check.finish_reason))
                sample.pending_text = ""
                break
    return finished


def attach_prompt_kv(kv: KVCacheManager, request: Request, blocks: list[KVBlock]) -> None:
    """Give the request's live samples the prompt's KV in `blocks` (taken from a reservation).

    The lead sample takes the blocks over and the other live samples share them (copy-on-write as
    after a fork); every sample counts the prompt as computed, so its next step computes its
    generated tokens. The prompt's full blocks join the prefix cache.
    """
    lead_sample = request.lead_sample
    lead_sample.block_table = list(blocks)
    lead_sample.num_computed_tokens = request.num_prompt_tokens
    kv.cache_full_blocks(lead_sample)
    kv.fork(lead_sample, [s for s in request.live_samples if s is not lead_sample])
    request.forked = True
