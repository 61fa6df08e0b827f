"""OpenAI's sampling fields as the router's SamplingParams.

OpenAI names map one to one (max_tokens, temperature, top_p, n, stop, seed, presence_penalty,
frequency_penalty); chat's max_completion_tokens is max_tokens and its logprobs/top_logprobs
become the router's `logprobs` count. vLLM's extensions top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids and pdserve's no_speculation pass through; logit_bias (token id
strings to a bias in [-100, 100]) becomes a map of ids. Ranges are the router's (see
models/sampling_params.py), within the protobuf field types (protos/pdserve/v1/router.proto).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.models.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_VALUE,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SamplingParams,
    SamplingParamsError,
)
from pdserve.openai.limits import INT32_MAX, MAX_STOP_TOKEN_IDS, UINT32_MAX
from pdserve.openai.protocol import int_list, invalid, opt_bool, opt_dict, opt_float, opt_int, str_list
from pdserve.runtime.sampling_proto import structured_to_proto
from pdserve.v1 import router_pb2

SEED_MIN, SEED_LIMIT = -(2**63), 2**64  # negative seeds (int64, as clients send) wrap to uint64


@dataclass(frozen=True)
class Limits:
    """What the served model allows, from the router's GetModelInfo (vocab_size bounds
    stop_token_ids; by default only their uint32 type does)."""

    max_model_len: int
    max_n: int
    max_logprobs: int
    vocab_size: int = UINT32_MAX + 1


def read_sampling(body: dict[str, Any], limits: Limits, chat: bool) -> dict[str, Any]:
    """The validated sampling fields the request sets, under the router's names (max_tokens may
    be absent: the caller picks the default). Raises OpenAIError (400) naming a bad field."""
    fields: dict[str, Any] = {}
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    _put(fields, "max_tokens", opt_int(body, max_name, 1, limits.max_model_len))
    _put(fields, "temperature", opt_float(body, "temperature", 0.0, 100.0))
    _put(fields, "top_p", opt_float(body, "top_p", 0.0, 1.0, lo_open=True))
    _put(fields, "top_k", opt_int(body, "top_k", -1, INT32_MAX))
    _put(fields, "min_p", opt_float(body, "min_p", 0.0, 1.0))
    _put(fields, "repetition_penalty", opt_float(body, "repetition_penalty", 0.0, 10.0, lo_open=True))
    _put(fields, "presence_penalty", opt_float(body, "presence_penalty", -2.0, 2.0))
    _put(fields, "frequency_penalty", opt_float(body, "frequency_penalty", -2.0, 2.0))
    seed = opt_int(body, "seed", SEED_MIN, SEED_LIMIT - 1)
    _put(fields, "seed", None if seed is None else seed % SEED_LIMIT)
    _put(fields, "n", opt_int(body, "n", 1, limits.max_n))
    _put(fields, "min_tokens", opt_int(body, "min_tokens", 0, UINT32_MAX))
    _put(fields, "logprobs", _read_logprobs(body, limits, chat))
    fields["stop"] = str_list(body, "stop", MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS)
    fields["stop_token_ids"] = int_list(body, "stop_token_ids", 0, limits.vocab_size - 1, MAX_STOP_TOKEN_IDS)
    fields["ignore_eos"] = bool(opt_bool(body, "ignore_eos"))
    fields["no_speculation"] = bool(opt_bool(body, "no_speculation"))  # pdserve's extension, like ignore_eos
    _put(fields, "logit_bias", _read_logit_bias(body, limits.vocab_size))
    # (Without max_tokens the caller's default applies, and to_proto checks min_tokens against it.)
    if "min_tokens" in fields and "max_tokens" in fields and fields["min_tokens"] > fields["max_tokens"]:
        raise invalid("min_tokens must not exceed max_tokens", "min_tokens")
    return fields


def _read_logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float] | None:
    """logit_bias: {"token id": bias}, at most MAX_LOGIT_BIAS entries (counted before any is
    read), ids in the vocabulary, biases in [-100, 100]."""
    entries = opt_dict(body, "logit_bias")
    if not entries:
        return None
    if len(entries) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias has {len(entries)} entries; at most {MAX_LOGIT_BIAS} are allowed", "logit_bias")
    bias = {}
    for key, value in entries.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdecimal() and len(key) <= 10 else None
        if token is None or token >= vocab_size:
            raise invalid(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key[:32]!r}", "logit_bias")
        number = opt_float({"logit_bias": value}, "logit_bias", -MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE)
        if number is None:
            raise invalid(f"logit_bias values must be numbers, got null for token {token}", "logit_bias")
        bias[token] = number
    return bias


def _read_logprobs(body: dict[str, Any], limits: Limits, chat: bool) -> int | None:
    """Completions: logprobs is the top-N count. Chat: logprobs is a bool and top_logprobs the
    count (which needs logprobs true)."""
    if not chat:
        return opt_int(body, "logprobs", 0, limits.max_logprobs)
    wanted = opt_bool(body, "logprobs")
    top = opt_int(body, "top_logprobs", 0, limits.max_logprobs)
    if top is not None and not wanted:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    return (top or 0) if wanted else None


def to_proto(fields: dict[str, Any]) -> router_pb2.SamplingParams:
    """The router message for fields from read_sampling (after a final cross-field check by the
    SamplingParams dataclass itself)."""
    checked = {name: value for name, value in fields.items() if name != "no_speculation"}
    try:
        SamplingParams(**checked, speculative=not fields.get("no_speculation", False))
    except SamplingParamsError as exc:
        raise invalid(str(exc), str(exc).split(" ", 1)[0]) from exc
    message = {name: value for name, value in fields.items() if name != "structured"}
    return router_pb2.SamplingParams(**message, structured_output=structured_to_proto(fields.get("structured")))


def _put(fields: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        fields[name] = value
