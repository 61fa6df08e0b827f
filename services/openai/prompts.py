"""A request's prompt as the router gets it, bounded before any work is done on it.

Completions: `prompt` is text (the router tokenizes it) or token ids; the counts, characters
and lengths are checked here (limits.py). Chat: the messages are checked and measured on the
event loop (cheap, bounded), then the checkpoint's template is rendered and its output tokenized
on the Frontend's preparation threads, with the tokenizer's GIL-releasing batch call so the
event loop keeps serving; the token count is checked against the context before the router
sees the request.
"""

from __future__ import annotations

from typing import Any

from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.chat_template import ChatTemplate, json_chars, normalize_messages
from pdserve.openai.frontend import Frontend
from pdserve.openai.limits import MAX_CHAT_CHARS, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_RENDERED_CHARS
from pdserve.openai.protocol import OpenAIError, invalid, opt_bool, opt_dict, reject_if_set, require_text
from pdserve.openai.tools import template_messages

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def read_prompts(body: dict[str, Any], max_model_len: int, vocab_size: int) -> list[str | list[int]]:
    """`prompt` as a list: a string, a list of strings, a list of token ids, or a list of those.
    At most MAX_PROMPTS prompts; text of at most MAX_PROMPT_CHARS valid Unicode characters;
    token-id lists shorter than the context, each id in the vocabulary."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and not isinstance(prompt[0], (str, list))):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise _bad_prompt()
    if len(prompts) > MAX_PROMPTS:
        raise invalid(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    for p in prompts:
        if isinstance(p, str):
            if len(p) > MAX_PROMPT_CHARS:
                raise invalid(f"a prompt has {len(p)} characters; at most {MAX_PROMPT_CHARS} are allowed",
                              "prompt", CONTEXT_LENGTH_EXCEEDED)
            require_text(p, "prompt", "the prompt")
            continue
        if not isinstance(p, list):
            raise _bad_prompt()
        if not p:
            raise invalid("a token-id prompt must not be empty", "prompt")
        if len(p) >= max_model_len:  # checked before the ids are looked at
            raise invalid(f"a prompt of {len(p)} tokens leaves no room in the model's context of "
                          f"{max_model_len} tokens", "prompt", CONTEXT_LENGTH_EXCEEDED)
        if not all(_is_token(t) for t in p):
            raise _bad_prompt()
        if max(p) >= vocab_size:
            raise invalid(f"prompt token id {max(p)} is outside the vocabulary (size {vocab_size})", "prompt")
    return prompts


def _bad_prompt() -> OpenAIError:
    return invalid("prompt must be a string, a list of strings, a list of token ids or a list of "
                   "token-id lists", "prompt")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def chat_prompt_ids(front: Frontend, body: dict[str, Any], max_tokens: int | None,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The token ids of the rendered conversation (the template sees `tools` when given). 400 when the
    model has no chat template, the messages are malformed or over the bounds, the request uses the
    deprecated functions fields, or the prompt (plus max_tokens, when given) does not fit the context."""
    if front.chat_template is None:
        raise invalid("this model has no chat template; use /v1/completions", "messages")
    for name in ("functions", "function_call"):
        reject_if_set(body, name, (None, [], "none"))
    add_generation_prompt = opt_bool(body, "add_generation_prompt")
    extra = opt_dict(body, "chat_template_kwargs")
    budget = MAX_CHAT_CHARS - (json_chars(extra, "chat_template_kwargs", "chat_template_kwargs") if extra else 0)
    if budget < 0:
        raise invalid(f"chat_template_kwargs has over {MAX_CHAT_CHARS} characters", "chat_template_kwargs")
    messages = template_messages(normalize_messages(body.get("messages"), budget))
    ids = await front.prepare(render_and_tokenize, front.chat_template, front.tokenizer, messages,
                              True if add_generation_prompt is None else add_generation_prompt, extra, tools)
    if not ids:
        raise invalid("the rendered conversation is empty", "messages")
    context = front.limits.max_model_len
    if len(ids) >= context:
        raise invalid(f"the conversation is {len(ids)} tokens, which leaves no room in the model's context of "
                      f"{context} tokens", "messages", CONTEXT_LENGTH_EXCEEDED)
    if max_tokens is not None and len(ids) + max_tokens > context:
        raise invalid(f"the conversation ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                      f"context of {context} tokens", "messages", CONTEXT_LENGTH_EXCEEDED)
    return ids


def render_and_tokenize(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict[str, Any]],
                        add_generation_prompt: bool, extra: dict[str, Any] | None,
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The prompt's token ids (no special tokens added: the template has them). Runs on a
    preparation thread; raises OpenAIError (400, "messages") for a rendering over
    MAX_RENDERED_CHARS or one that is not valid Unicode."""
    text = template.render(messages, add_generation_prompt, extra, tools)
    if len(text) > MAX_RENDERED_CHARS:
        raise invalid(f"the rendered conversation has {len(text)} characters; at most {MAX_RENDERED_CHARS} "
                      "are allowed", "messages")
    require_text(text, "messages", "the conversation")
    # encode_batch releases the GIL while it works (encode holds it): the event loop runs meanwhile.
    return tokenizer.backend.encode_batch([text], add_special_tokens=False)[0].ids
