"""The generation endpoints: POST /v1/completions and POST /v1/chat/completions, each as a JSON
response or, with stream true, as server-sent events.

Completions: one Generate call per prompt, choices indexed prompt * n + sample. Chat: the
checkpoint's chat template renders the messages, the front end tokenizes the prompt (no special
tokens added: the template has them) and sends the ids (prompts.py). The sampling fields are
checked before the prompt, so a bad field costs no tokenizing.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from aiohttp import web

from pdserve.models.sampling_params import StructuredOutput
from pdserve.openai.body import read_body
from pdserve.openai.echo import join_logprobs, prompt_logprobs_json, prompt_texts, read_echo, text_length, without_generation
from pdserve.openai.frontend import Frontend, frontend_of
from pdserve.openai.prompts import chat_prompt_ids, read_prompts
from pdserve.openai.protocol import invalid, read_stream_flags, reject_if_set
from pdserve.openai.responses import (
    ChoiceResult,
    TokenEvent,
    Usage,
    chat_logprobs,
    collect,
    completion_logprobs,
    relay_stream,
)
from pdserve.openai.sampling import read_sampling, to_proto
from pdserve.openai.structured import check_constraint, read_structured
from pdserve.openai.tools import ToolCallStream, ToolRequest, parse_reply, read_tools, tool_grammar
from pdserve.v1 import router_pb2

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API


def _generate_request(request_id: str, prompt: str | list[int],
                      sampling: router_pb2.SamplingParams) -> router_pb2.GenerateRequest:
    if isinstance(prompt, str):
        return router_pb2.GenerateRequest(request_id=request_id, prompt=prompt, sampling=sampling)
    return router_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=router_pb2.TokenIds(ids=prompt),
                                      sampling=sampling)


async def create_completion(request: web.Request) -> web.StreamResponse:
    """Handle POST /v1/completions (JSON response, or server-sent events with stream true)."""
    front = frontend_of(request)
    body = await read_body(request)
    model = front.check_model(body)
    reject_if_set(body, "suffix", (None, ""))
    echo, sampling_body = read_echo(body)
    fields = read_sampling(sampling_body, front.limits, chat=False)
    prompts = read_prompts(body, front.limits.max_model_len, front.info.vocab_size)
    fields.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    if echo.on and "logprobs" in fields:
        fields["prompt_logprobs"] = fields["logprobs"]
    await _constrain(front, fields, read_structured(body))
    reject_if_set(body, "best_of", (None, 1, fields.get("n", 1)))
    stream, include_usage = read_stream_flags(body)
    sampling = to_proto(fields)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    calls = [_generate_request(f"{request_id}-{i}", p, sampling) for i, p in enumerate(prompts)]
    n, want_logprobs = fields.get("n", 1), "logprobs" in fields
    echoed = await front.prepare(prompt_texts, front.tokenizer, prompts) if echo.on else None
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None}
    generated = front.link.generate_many(calls, "prompt")
    async with contextlib.aclosing(without_generation(generated) if echo.only else generated) as events:
        if stream:
            return await relay_stream(request, events, _CompletionChunks(front, head, want_logprobs, n, echoed),
                                      include_usage, front.metrics)
        scores: dict[int, router_pb2.PromptLogprobs] = {}
        choices, usage = await collect(events, len(prompts) * n, scores)
    front.metrics.count_tokens(usage.as_json()["prompt_tokens"], usage.completion_tokens)
    prompt_json = {index: prompt_logprobs_json(front.strings, s) for index, s in scores.items()}  # once per prompt
    return web.json_response({**head, "choices": [
        _completion_choice(front, i, c, echoed[i // n] if echoed else "", prompt_json.get(i // n), want_logprobs)
        for i, c in enumerate(choices)], "usage": usage.as_json()})


def _completion_choice(front: Frontend, index: int, choice: ChoiceResult, echoed: str,
                       prompt_json: dict[str, Any] | None, want_logprobs: bool) -> dict[str, Any]:
    """One choice of a completions response: the echoed prompt (if any) and its scores' logprobs object lead."""
    logprobs = None
    if want_logprobs:
        head = prompt_json
        tail = completion_logprobs(front.strings, choice.token_ids, choice.logprobs, choice.top_logprobs,
                                   text_length(head) if head else 0)
        logprobs = join_logprobs(head, tail if choice.token_ids or head is None else None)
    return {"index": index, "text": echoed + choice.text, "finish_reason": choice.finish_reason, "logprobs": logprobs}


class _CompletionChunks:
    """Turns TokenEvents into text_completion stream chunks (text offsets tracked per choice). With
    echo, each choice's first chunk is its prompt (text, and the prompt scores when they come)."""

    def __init__(self, front: Frontend, head: dict[str, Any], want_logprobs: bool, n: int = 1,
                 echoed: list[str] | None = None) -> None:
        self.front = front
        self.head = head
        self.want_logprobs = want_logprobs
        self.n = n
        self.echoed = echoed
        self.offsets: dict[int, int] = {}

    def opening(self) -> list[dict[str, Any]]:
        """Echo without logprobs: each choice's prompt text (with logprobs it waits for the scores)."""
        if self.echoed is None or self.want_logprobs:
            return []
        return [{**self.head, "choices": [{"index": i, "text": self.echoed[i // self.n], "logprobs": None,
                                           "finish_reason": None}]} for i in range(len(self.echoed) * self.n)]

    def chunk(self, event: TokenEvent) -> dict[str, Any] | None:
        """The chunk for one event (None for an empty one)."""
        if event.prompt_logprobs is not None:
            return self._echo_chunk(event.prompt_index, event.prompt_logprobs)
        if event.finish_reason is None and not event.text and not (self.want_logprobs and event.token_ids):
            return None  # tokens whose text is held back (a possible stop string, half a character)
        logprobs = None
        if self.want_logprobs and event.token_ids:
            offset = self.offsets.get(event.choice, 0)
            logprobs = completion_logprobs(self.front.strings, event.token_ids, event.logprobs,
                                           event.top_logprobs, offset)
            self.offsets[event.choice] = offset + sum(len(t) for t in logprobs["tokens"])
        return {**self.head, "choices": [{"index": event.choice, "text": event.text, "logprobs": logprobs,
                                          "finish_reason": event.finish_reason}]}

    def _echo_chunk(self, prompt_index: int, scores: router_pb2.PromptLogprobs) -> dict[str, Any] | None:
        """The echoed prompt of each of the prompt's choices, with its scores."""
        if self.echoed is None or not self.want_logprobs:
            return None
        logprobs = prompt_logprobs_json(self.front.strings, scores)
        choices = []
        for index in range(prompt_index * self.n, (prompt_index + 1) * self.n):
            self.offsets[index] = text_length(logprobs)
            choices.append({"index": index, "text": self.echoed[prompt_index], "logprobs": logprobs,
                            "finish_reason": None})
        return {**self.head, "choices": choices}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        return {**self.head, "choices": [], "usage": usage.as_json()}


async def _constrain(front: Frontend, fields: dict[str, Any], constraint: tuple[StructuredOutput, str] | None) -> None:
    """Compile the request's output constraint (a 400 naming its field when it does not) and add it to the fields."""
    if constraint is not None:
        await front.prepare(check_constraint, front.grammars, *constraint)
        fields["structured"] = constraint[0]


def _tool_setup(front: Frontend, body: dict[str, Any]) -> tuple[ToolRequest | None, str | None,
                                                                 tuple[StructuredOutput, str] | None]:
    """The request's tools, the format its reply is parsed in (None: not parsed), and its output constraint
    (its response format's, or the calls a forced tool choice allows)."""
    tools = read_tools(body)
    constraint = read_structured(body)
    if tools is None or not tools.parses:
        return tools, None, constraint
    call_format = front.tool_call_format
    if call_format is None:
        raise invalid("this model's chat template renders no tools (start the server with --tool-call-parser to "
                      "name the format the model writes calls in)", "tools")
    if tools.forced:
        if constraint is not None:
            raise invalid(f"tool_choice {tools.choice!r} cannot be combined with {constraint[1]}", "tool_choice")
        constraint = (StructuredOutput("grammar", tool_grammar(tools, call_format)), "tool_choice")
    return tools, call_format, constraint


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """Handle POST /v1/chat/completions (JSON response, or server-sent events with stream true)."""
    front = frontend_of(request)
    body = await read_body(request)
    model = front.check_model(body)
    fields = read_sampling(body, front.limits, chat=True)
    tools, call_format, constraint = _tool_setup(front, body)
    await _constrain(front, fields, constraint)
    prompt_ids = await chat_prompt_ids(front, body, fields.get("max_tokens"),
                                       tools.tools if tools is not None and tools.parses else None)
    # OpenAI's chat default: generate until the context is full (or a stop/eos comes first).
    fields.setdefault("max_tokens", max(1, front.limits.max_model_len - len(prompt_ids)))
    stream, include_usage = read_stream_flags(body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    call = router_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=router_pb2.TokenIds(ids=prompt_ids),
                                      sampling=to_proto(fields))
    n, want_logprobs = fields.get("n", 1), "logprobs" in fields
    head = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None}
    async with contextlib.aclosing(front.link.generate_many([call], "messages")) as events:
        if stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            chunks = _ChatChunks(front, chunk_head, n, want_logprobs, call_format, _named(tools))
            return await relay_stream(request, events, chunks, include_usage, front.metrics)
        choices, usage = await collect(events, n)
    front.metrics.count_tokens(usage.as_json()["prompt_tokens"], usage.completion_tokens)
    return web.json_response({**head, "choices": [_chat_choice(front, i, c, want_logprobs, call_format, _named(tools))
                                                  for i, c in enumerate(choices)], "usage": usage.as_json()})


def _named(tools: ToolRequest | None) -> bool:
    """The request names the function its reply calls."""
    return tools is not None and tools.forced and tools.choice != "required"


def _calls_finish(finish_reason: str | None, named: bool) -> str | None:
    """A reply with calls ends with "tool_calls", as OpenAI's do, except under a named tool_choice ("stop")."""
    return ("stop" if named else "tool_calls") if finish_reason == "stop" else finish_reason


def _chat_choice(front: Frontend, index: int, choice: ChoiceResult, want_logprobs: bool,
                 call_format: str | None, named: bool) -> dict[str, Any]:
    """One choice of a chat response; with tools, the reply's calls parsed out of its text."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    finish_reason = choice.finish_reason
    if call_format is not None:
        reply = parse_reply(choice.text, call_format)
        if reply.tool_calls:
            message = {"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls}
            finish_reason = _calls_finish(finish_reason, named)
    return {"index": index, "message": message, "finish_reason": finish_reason,
            "logprobs": chat_logprobs(front.strings, choice.token_ids, choice.logprobs, choice.top_logprobs)
            if want_logprobs else None}


class _ChatChunks:
    """Turns TokenEvents into chat.completion.chunk objects: a role delta per choice first,
    content deltas, then an empty delta carrying the finish_reason."""

    def __init__(self, front: Frontend, head: dict[str, Any], num_choices: int, want_logprobs: bool,
                 call_format: str | None = None, named: bool = False) -> None:
        self.front = front
        self.head = head
        self.num_choices = num_choices
        self.want_logprobs = want_logprobs
        # With tools, each choice's text goes through a ToolCallStream (content and call deltas).
        self.tool_streams = {i: ToolCallStream(call_format) for i in range(num_choices)} if call_format else None
        self.named = named

    def opening(self) -> list[dict[str, Any]]:
        """One chunk per choice announcing the assistant role."""
        return [self._chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(self.num_choices)]

    def chunk(self, event: TokenEvent) -> dict[str, Any] | None:
        """The chunk for one event (None for an empty one)."""
        if self.tool_streams is not None:
            return self._tool_chunk(event)
        if event.finish_reason is not None:
            return self._chunk(event.choice, {}, None, event.finish_reason)
        if not event.text and not (self.want_logprobs and event.token_ids):
            return None  # tokens whose text is held back (a possible stop string, half a character)
        logprobs = None
        if self.want_logprobs and event.token_ids:
            logprobs = chat_logprobs(self.front.strings, event.token_ids, event.logprobs, event.top_logprobs)
        return self._chunk(event.choice, {"content": event.text}, logprobs, None)

    def _tool_chunk(self, event: TokenEvent) -> dict[str, Any] | None:
        """A tools reply's chunk: its text's content and call deltas merged into one delta (logprobs go with
        the tokens that released them)."""
        stream = self.tool_streams[event.choice]
        deltas = stream.push(event.text) if event.text else []
        finish_reason = event.finish_reason
        if finish_reason is not None:
            last, made_calls = stream.finish()
            deltas += last
            finish_reason = _calls_finish(finish_reason, self.named) if made_calls else finish_reason
        delta: dict[str, Any] = {}
        for part in deltas:
            if "content" in part:
                delta["content"] = delta.get("content", "") + part["content"]
            else:
                delta["tool_calls"] = delta.get("tool_calls", []) + part["tool_calls"]
        logprobs = None
        if self.want_logprobs and event.token_ids:
            logprobs = chat_logprobs(self.front.strings, event.token_ids, event.logprobs, event.top_logprobs)
        if not delta and finish_reason is None and logprobs is None:
            return None
        return self._chunk(event.choice, delta, logprobs, finish_reason)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        return {**self.head, "choices": [], "usage": usage.as_json()}

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {**self.head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]}
