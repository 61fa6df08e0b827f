"""Chat templates rendered the way `transformers`' apply_chat_template renders them.

The template is the checkpoint's own (tokenizer_config.json or chat_template.jinja, read by
pdserve.models.tokenizer), Jinja source from a model hub and so untrusted: it runs in an immutable
sandbox with transformers' environment (trim_blocks, lstrip_blocks, loop controls, a tojson
that keeps non-ASCII, raise_exception, strftime_now, dict and an underscore-proof namespace)
and sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `tools`/`documents`.

`normalize_messages` bounds the conversation before any template runs (limits.py: message count,
content parts, characters per message and in all); `json_chars` measures the other JSON a
template may see.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.openai.limits import MAX_CHAT_CHARS, MAX_CONTENT_PARTS, MAX_MESSAGE_CHARS, MAX_MESSAGES, short_repr
from pdserve.openai.protocol import invalid, require_text

ROLES = ("system", "developer", "user", "assistant", "tool")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template for `source` in the sandboxed environment (cached)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


class ChatTemplate:
    """A checkpoint's chat template with its special tokens; `render` gives the prompt text."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self.template = compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from exc

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for `messages` (validated, see normalize_messages). `extra` are the
        request's chat_template_kwargs; `tools` the request's tool definitions (None: no tools).
        Raises OpenAIError (400) when the template rejects the conversation (raise_exception) or
        fails on it."""
        variables = {**(extra or {}), "messages": messages, "add_generation_prompt": add_generation_prompt,
                     "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "tools": tools or None, "documents": None}
        try:
            return self.template.render(**variables)
        except jinja2.exceptions.SecurityError as exc:
            raise invalid(f"the chat template refused the request: {exc}", "messages") from exc
        except jinja2.TemplateError as exc:
            raise invalid(f"the chat template cannot render these messages: {exc}", "messages") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            raise invalid(f"the chat template failed on these messages: {type(exc).__name__}: {exc}",
                          "messages") from exc


def normalize_messages(raw: Any, budget: int = MAX_CHAT_CHARS) -> list[dict[str, Any]]:
    """The chat messages as plain dicts: each needs a known `role`; `content` is a string, a
    list of text parts (joined with newlines, as vLLM does for string templates) or null (an
    assistant turn with tool calls). Other JSON fields (name, tool_calls, tool_call_id...) pass
    through to the template. At most MAX_MESSAGES messages, MAX_MESSAGE_CHARS characters in one
    (content plus its other fields as JSON) and `budget` in all. Raises OpenAIError (400, param
    "messages") otherwise."""
    if not isinstance(raw, list) or not raw:
        raise invalid("messages must be a non-empty list of message objects", "messages")
    if len(raw) > MAX_MESSAGES:
        raise invalid(f"messages has {len(raw)} entries; at most {MAX_MESSAGES} are allowed", "messages")
    messages, total = [], 0
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {list(ROLES)}, got {short_repr(role)}", "messages")
        content = _content_text(message.get("content"), i, role)
        require_text(content or "", "messages", f"messages[{i}].content")
        others = {k: v for k, v in message.items() if k not in ("role", "content")}
        size = len(content or "") + (json_chars(others, f"messages[{i}]", "messages") if others else 0)
        if size > MAX_MESSAGE_CHARS:
            raise invalid(f"messages[{i}] has {size} characters; at most {MAX_MESSAGE_CHARS} are allowed", "messages")
        total += size
        if total > budget:
            raise invalid(f"the messages have over {budget} characters in all", "messages")
        messages.append({**message, "content": content})
    return messages


def json_chars(value: Any, what: str, param: str) -> int:
    """How many characters `value` has as JSON text (what a template printing it would hold);
    a 400 naming `param` when it is no plain JSON (a NumberTooLarge, nesting too deep) or holds
    a lone surrogate."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise invalid(f"{what} cannot be used: {type(exc).__name__}: {short_repr(str(exc))}", param) from exc
    require_text(text, param, what)
    return len(text)


def _content_text(content: Any, index: int, role: str) -> str | None:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return None
    if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
        raise invalid(f"messages[{index}].content has {len(content)} parts; at most {MAX_CONTENT_PARTS} are allowed",
                      "messages")
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}].content: only text parts ({{\"type\": \"text\", "
                              f"\"text\": ...}}) are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts", "messages")
