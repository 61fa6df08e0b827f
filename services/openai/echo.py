"""Completions' `echo`: each choice's text starts with its prompt, and with `logprobs` N its logprobs
start with the prompt tokens' (the router's prompt scores; the first token's logprob and
alternatives are null, as OpenAI gives them). `max_tokens: 0` with echo returns the prompt alone:
the router is asked for one token, which is dropped (finish_reason "length", no completion tokens),
which is how evaluation harnesses score a text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.protocol import opt_bool
from pdserve.openai.responses import TokenEvent, TokenStrings, completion_logprobs
from pdserve.v1 import router_pb2


@dataclass(frozen=True)
class Echo:
    """What a completions request echoes: on (echo true), only (max_tokens 0: nothing generated)."""

    on: bool = False
    only: bool = False


def read_echo(body: dict[str, Any]) -> tuple[Echo, dict[str, Any]]:
    """The request's Echo, and the body to read the sampling fields from (max_tokens 0 with echo
    reads as 1: the token is generated and dropped). Without echo, max_tokens 0 stays a 400."""
    on = bool(opt_bool(body, "echo"))
    only = on and type(body.get("max_tokens")) is int and body["max_tokens"] == 0
    return Echo(on, only), ({**body, "max_tokens": 1} if only else body)


def prompt_texts(tokenizer: Tokenizer, prompts: list[str | list[int]]) -> list[str]:
    """The text each prompt echoes: a text prompt itself, token ids decoded (special tokens kept).
    Runs on a preparation thread (a prompt may be long)."""
    return [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in prompts]


def prompt_logprobs_json(strings: TokenStrings, scores: router_pb2.PromptLogprobs) -> dict[str, Any]:
    """The completions `logprobs` object of the prompt's tokens: the first token's logprob and
    alternatives null, the others' from the scores; offsets from 0."""
    token_ids = list(scores.token_ids)
    top = [list(zip(t.token_ids, t.logprobs)) for t in scores.top_logprobs]
    first = completion_logprobs(strings, token_ids[:1], [0.0], [], 0)
    rest = completion_logprobs(strings, token_ids[1:], list(scores.logprobs), top, len(first["tokens"][0]))
    return {"tokens": first["tokens"] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": first["text_offset"] + rest["text_offset"]}


def text_length(logprobs: dict[str, Any]) -> int:
    """Characters the logprobs' tokens span (where the next token's text_offset starts)."""
    return sum(len(t) for t in logprobs["tokens"])


def join_logprobs(head: dict[str, Any] | None, tail: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two completions `logprobs` objects one after the other (tail's offsets already continue head's)."""
    if head is None or tail is None:
        return head or tail
    return {key: head[key] + tail[key] for key in head}


async def without_generation(events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """`events` with the generated tokens dropped (echo with max_tokens 0): prompt scores pass, each
    choice's end comes as finish_reason "length" with no completion tokens."""
    async for event in events:
        if event.prompt_logprobs is not None:
            yield event
        elif event.finish_reason is not None:
            yield dataclasses.replace(event, text="", token_ids=[], logprobs=[], top_logprobs=[],
                                      finish_reason="length", completion_tokens=0)
