"""Sampling parameters between proto messages and pdserve.models.sampling_params.SamplingParams.

The public pdserve.v1.SamplingParams has optional fields (unset: the dataclass defaults);
the internal EngineSamplingParams has every field resolved, the seed included, so workers
apply it without defaults logic.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import replace

import numpy as np

from pdserve.models.sampling_params import MAX_STRUCTURED_CHARS, SamplingParams, SamplingParamsError, StructuredOutput
from pdserve.runtime.errors import InvalidRequestError
from pdserve.v1 import router_pb2, worker_pb2

SEED_BITS = 63  # drawn seeds fit a signed 64-bit integer, friendly to every client language

# Optional scalar fields of the public message with the same name in SamplingParams.
_OPTIONAL_FIELDS = ("max_tokens", "top_k", "seed", "n", "logprobs", "min_tokens", "prompt_logprobs")
_OPTIONAL_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty",
                          "presence_penalty", "frequency_penalty")


def sampling_params_from_proto(message: router_pb2.SamplingParams | None) -> SamplingParams:
    """Validated SamplingParams from the public message; unset optional fields take the
    defaults (max_tokens 16, temperature 1.0, top_p 1.0, top_k off, n 1, no logprobs, seed
    None). Raises SamplingParamsError (INVALID_ARGUMENT) naming an out-of-range field; the
    lists' lengths are checked first, so an oversized message is refused without walking it."""
    if message is None:
        return SamplingParams()
    fields: dict = {name: getattr(message, name) for name in _OPTIONAL_FIELDS
                    if message.HasField(name)}
    fields.update((name, _from_float32(getattr(message, name))) for name in _OPTIONAL_FLOAT_FIELDS
                  if message.HasField(name))
    # The repeated fields go in as they are: SamplingParams checks their lengths before copying.
    return SamplingParams(stop=message.stop, stop_token_ids=message.stop_token_ids,
                          ignore_eos=message.ignore_eos, speculative=not message.no_speculation,
                          logit_bias=_Float32Bias(message.logit_bias), structured=_structured_of(message), **fields)


def with_resolved_seed(params: SamplingParams) -> SamplingParams:
    """params with a random seed drawn when it has none (done once, by the router)."""
    if params.seed is not None:
        return params
    return replace(params, seed=secrets.randbits(SEED_BITS))


def engine_sampling_params_to_proto(params: SamplingParams) -> worker_pb2.EngineSamplingParams:
    """The internal message for params, whose seed must already be resolved."""
    if params.seed is None:
        raise InvalidRequestError("EngineSamplingParams needs a resolved seed: "
                                  "call with_resolved_seed(params) first")
    return worker_pb2.EngineSamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        seed=params.seed, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, n=params.n, return_logprobs=params.logprobs is not None,
        min_tokens=params.min_tokens, top_logprobs=params.logprobs or 0, no_speculation=not params.speculative,
        return_prompt_logprobs=params.prompt_logprobs is not None, prompt_logprobs=params.prompt_logprobs or 0,
        logit_bias=dict(params.logit_bias), structured_output=structured_to_proto(params.structured))


def sampling_params_from_engine_proto(message: worker_pb2.EngineSamplingParams) -> SamplingParams:
    """Validated SamplingParams (seed set) from the internal message, taken as it is.
    Raises SamplingParamsError / InvalidRequestError (INVALID_ARGUMENT) on a bad field."""
    if not message.return_logprobs and message.top_logprobs:
        raise InvalidRequestError("EngineSamplingParams.top_logprobs is set but "
                                  "return_logprobs is false")
    if not message.return_prompt_logprobs and message.prompt_logprobs:
        raise InvalidRequestError("EngineSamplingParams.prompt_logprobs is set but "
                                  "return_prompt_logprobs is false")
    return SamplingParams(
        max_tokens=message.max_tokens, temperature=message.temperature, top_p=message.top_p,
        top_k=message.top_k, min_p=message.min_p, repetition_penalty=message.repetition_penalty,
        presence_penalty=message.presence_penalty, frequency_penalty=message.frequency_penalty,
        seed=message.seed, stop=message.stop, stop_token_ids=message.stop_token_ids,
        ignore_eos=message.ignore_eos, n=message.n, min_tokens=message.min_tokens,
        logprobs=message.top_logprobs if message.return_logprobs else None, speculative=not message.no_speculation,
        prompt_logprobs=message.prompt_logprobs if message.return_prompt_logprobs else None,
        logit_bias=message.logit_bias, structured=_structured_of(message))


def structured_to_proto(structured: StructuredOutput | None) -> router_pb2.StructuredOutput | None:
    """The message of a constraint (None for none)."""
    if structured is None:
        return None
    if structured.kind == "json_object":
        return router_pb2.StructuredOutput(json_object=True)
    if structured.kind == "choice":
        return router_pb2.StructuredOutput(choice=router_pb2.StringList(values=json.loads(structured.spec)))
    return router_pb2.StructuredOutput(**{structured.kind: structured.spec})


def _structured_of(message) -> StructuredOutput | None:
    """The constraint of a SamplingParams / EngineSamplingParams message (its structured_output field);
    a choice list's size is bounded before it is copied."""
    if not message.HasField("structured_output"):
        return None
    constraint = message.structured_output
    kind = constraint.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object":
        if not constraint.json_object:
            raise SamplingParamsError("structured_output.json_object must be true when set")
        return StructuredOutput("json_object")
    if kind == "choice":
        values = constraint.choice.values
        if len(values) > MAX_STRUCTURED_CHARS // 2 or sum(len(v) for v in values) > MAX_STRUCTURED_CHARS:
            raise SamplingParamsError(f"structured_output.choice must hold at most {MAX_STRUCTURED_CHARS} characters")
        return StructuredOutput("choice", json.dumps(list(values)))
    return StructuredOutput(kind, getattr(constraint, kind))


class _Float32Bias:
    """A public message's logit_bias map (float32 values) read as the decimals they stand for; its
    length is known before any entry is read (SamplingParams bounds it first)."""

    def __init__(self, entries) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def items(self):
        """(token id, bias) pairs."""
        return ((token, _from_float32(bias)) for token, bias in self.entries.items())


def _from_float32(value: float) -> float:
    """The shortest decimal that the float32 `value` stands for (0.7f -> 0.7, not
    0.699999988...), so a request sent over gRPC samples exactly like one made in process."""
    return float(str(np.float32(value)))
