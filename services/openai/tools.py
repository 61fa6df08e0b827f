"""Chat tool calls: the request's `tools` and `tool_choice`, and the model's output parsed into `tool_calls`.

Three output formats, picked from the checkpoint's chat template (or the server's --tool-call-parser):
- "hermes" (Qwen2, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, once per call;
  text before the first tag is the message's content.
- "llama3_json" (Llama 3.1+): the reply is a JSON object `{"name": ..., "parameters": {...}}` (optionally
  after `<|python_tag|>`; several calls separated by `;`).
Text after a reply's last well-formed call is dropped (OpenAI's message has no place for it).
- "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

`tool_choice`: "none" renders no tools and parses nothing; "auto" parses what the model writes (any number
of calls); "required" and a named function are guaranteed by constrained decoding: the reply is exactly one
call of an allowed function, with arguments that satisfy its parameters schema (tool_grammar). A streamed
reply's calls are sent as OpenAI streams them: content deltas up to the format's opening marker, then each
call in one delta (index, id, type, name and the whole arguments string) once its text is complete; text
that turns out not to be a call is sent as content at the end.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.openai.chat_template import json_chars
from pdserve.openai.protocol import invalid

FORMATS = ("hermes", "llama3_json", "mistral")
MAX_TOOLS = 128
MAX_TOOLS_CHARS = 200_000  # all tool definitions as JSON text
MAX_NAME_CHARS = 64

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL_OPEN = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


def format_of_template(template_source: str | None) -> str | None:
    """The tool-call format a chat template writes, or None when it renders no tools."""
    if not template_source or "tools" not in template_source:
        return None
    if _HERMES_OPEN in template_source:
        return "hermes"
    if _MISTRAL_OPEN in template_source:
        return "mistral"
    if "ipython" in template_source or _PYTHON_TAG in template_source or "<|start_header_id|>" in template_source:
        return "llama3_json"
    return None


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools: their definitions (for the template), their parameter schemas by name,
    and the choice ("none", "auto", "required" or the name of the function the reply must call)."""

    tools: list[dict[str, Any]]
    parameters: dict[str, dict[str, Any]]
    choice: str

    @property
    def forced(self) -> bool:
        """The reply must be a call ("required" or a named function)."""
        return self.choice not in ("none", "auto")

    @property
    def parses(self) -> bool:
        """The reply is parsed for calls."""
        return self.choice != "none"

    def allowed(self) -> list[str]:
        """The names the reply may call (forced choices)."""
        return list(self.parameters) if self.choice == "required" else [self.choice]


def read_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's `tools` and `tool_choice`, checked: each tool a function with a name of at most 64
    characters (letters, digits, _ and -) and an object `parameters` schema; names unique; at most
    MAX_TOOLS tools in MAX_TOOLS_CHARS of JSON. None without tools (then tool_choice may only be "none"
    or "auto"). 400 naming the field otherwise."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise invalid("tools must be a list of tool objects", "tools")
    if len(tools) > MAX_TOOLS:
        raise invalid(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed", "tools")
    if json_chars(tools, "tools", "tools") > MAX_TOOLS_CHARS:
        raise invalid(f"the tools have over {MAX_TOOLS_CHARS} characters of JSON", "tools")
    parameters: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise invalid(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        name = function.get("name")
        if not _is_name(name):
            raise invalid(f"tools[{i}].function.name must be 1 to {MAX_NAME_CHARS} letters, digits, '_' or '-'",
                          "tools")
        if name in parameters:
            raise invalid(f"tools[{i}].function.name {name!r} is used twice", "tools")
        schema = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(schema, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        parameters[name] = schema
    return ToolRequest(tools, parameters, _read_choice(choice, parameters))


def _read_choice(choice: Any, parameters: dict[str, dict[str, Any]]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise invalid("tool_choice must be \"none\", \"auto\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in parameters:
        raise invalid(f"tool_choice names the function {name[:MAX_NAME_CHARS]!r}, which is not in tools",
                      "tool_choice")
    return name


def _is_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS
            and all(c.isascii() and (c.isalnum() or c in "_-") for c in name))


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: an assistant turn's tool-call arguments, which OpenAI
    sends as JSON text, as the object they encode (templates print them with tojson)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and isinstance(calls, list):
            message = {**message, "tool_calls": [_decoded_arguments(call) for call in calls]}
        out.append(message)
    return out


def _decoded_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        decoded = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return call
    return {**call, "function": {**function, "arguments": decoded}} if isinstance(decoded, dict) else call


def calls_schema(request: ToolRequest, call_format: str) -> dict[str, Any]:
    """The JSON schema of the calls a forced reply may make (the part of the format that is JSON):
    one call object per allowed function, {"name": const, <arguments key>: its parameters}."""
    key = "parameters" if call_format == "llama3_json" else "arguments"
    one_of = [{"type": "object", "properties": {"name": {"const": name}, key: request.parameters[name]},
               "required": ["name", key], "additionalProperties": False} for name in request.allowed()]
    call = one_of[0] if len(one_of) == 1 else {"anyOf": one_of}
    if call_format == "mistral":
        return {"type": "array", "items": call, "minItems": 1, "maxItems": 1}
    return call


def tool_grammar(request: ToolRequest, call_format: str) -> str:
    """A Lark grammar (llguidance's dialect, JSON schemas inlined with %json) for a forced reply: exactly one
    call in the format's syntax (a reply that may go on calling could call until max_tokens cut it)."""
    # Compact JSON (as for response formats): a model must not be able to pad a forced call with whitespace.
    schema = json.dumps({**calls_schema(request, call_format), "x-guidance": {"whitespace_flexible": False}},
                        separators=(",", ":"))
    if call_format == "hermes":
        return f'start: "{_HERMES_OPEN}\\n" body "\\n{_HERMES_CLOSE}"\nbody: %json {schema}\n'
    if call_format == "mistral":
        return f'start: "{_MISTRAL_OPEN}" body\nbody: %json {schema}\n'
    return f"start: body\nbody: %json {schema}\n"


@dataclass
class ParsedReply:
    """A reply split into its content (None when only calls) and its calls in OpenAI's shape."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_reply(text: str, call_format: str) -> ParsedReply:
    """The model's whole reply parsed for calls in `call_format`; a reply with no well-formed call is all
    content."""
    start = _call_start(text, call_format)
    if start is None:
        return ParsedReply(text)
    calls = _parse_calls(text[start:], call_format)
    if calls is None:
        return ParsedReply(text)
    content = text[:start].strip() or None
    return ParsedReply(content, [_openai_call(name, arguments) for name, arguments in calls])


def _call_start(text: str, call_format: str) -> int | None:
    """Where the calls begin in the text, or None."""
    if call_format == "hermes":
        index = text.find(_HERMES_OPEN)
        return None if index < 0 else index
    if call_format == "mistral":
        index = text.find(_MISTRAL_OPEN)
        return None if index < 0 else index
    stripped = text.lstrip()
    if stripped.startswith(_PYTHON_TAG) or stripped.startswith("{"):
        return len(text) - len(stripped)
    return None


def _parse_calls(text: str, call_format: str) -> list[tuple[str, Any]] | None:
    """(name, arguments) of the well-formed calls that lead `text` (which starts at the calls), in order; what
    follows the last of them is not a call and is dropped. None when not even the first call is well-formed.
    The streamed and the whole reply are parsed by this one function, so both give the same calls."""
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    if call_format == "hermes":
        rest = text
        while rest.lstrip().startswith(_HERMES_OPEN):
            body, closed, after = rest.lstrip()[len(_HERMES_OPEN):].partition(_HERMES_CLOSE)
            parsed = _json_value(decoder, body.strip()) if closed else None
            if parsed is None or body.strip()[parsed[1]:].strip():
                break
            objects.append(parsed[0])
            rest = after
        key = "arguments"
    elif call_format == "mistral":
        parsed = _json_value(decoder, text[len(_MISTRAL_OPEN):].lstrip())
        objects = [] if parsed is None else (parsed[0] if isinstance(parsed[0], list) else [parsed[0]])
        key = "arguments"
    else:
        rest = text.lstrip().removeprefix(_PYTHON_TAG).lstrip()
        while rest:
            parsed = _json_value(decoder, rest)
            if parsed is None:
                break
            objects.append(parsed[0])
            rest = rest[parsed[1]:].lstrip()
            if not rest.startswith(";"):
                break
            rest = rest[1:].lstrip()
        key = "parameters"
    calls = []
    for obj in objects:
        arguments = obj.get(key, obj.get("arguments", {})) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(arguments, dict):
            break
        calls.append((obj["name"], arguments))
    return calls or None


def _json_value(decoder: json.JSONDecoder, text: str) -> tuple[Any, int] | None:
    """The JSON value text starts with and where it ends, or None."""
    try:
        return decoder.raw_decode(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolCallStream:
    """Splits a streamed reply into content deltas and tool-call deltas (see the module doc).

    push(text) returns the deltas the new text releases; finish() the rest at the end of the reply."""

    def __init__(self, call_format: str) -> None:
        self.call_format = call_format
        self.text = ""
        self.sent_content = 0  # characters of text sent as content
        self.calls_from: int | None = None  # where the calls begin, once seen
        self.num_calls_sent = 0

    def push(self, text: str) -> list[dict[str, Any]]:
        """Deltas ({"content": ...} or {"tool_calls": [...]}) released by the reply's next text."""
        self.text += text
        if self.calls_from is None:
            self.calls_from = _call_start(self.text, self.call_format)
        if self.calls_from is None:
            # Hold back what could still be the start of the opening marker.
            return self._content_up_to(len(self.text) - self._possible_marker_prefix())
        deltas = self._content_up_to(self.calls_from)
        # A call can only have completed with a closing character: parse again only then (not at every token).
        calls = self._complete_calls() if any(c in text for c in "}]>") else None
        if calls is not None and len(calls) > self.num_calls_sent:
            deltas.append({"tool_calls": [self._call_delta(i, *calls[i])
                                          for i in range(self.num_calls_sent, len(calls))]})
            self.num_calls_sent = len(calls)
        return deltas

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """The last deltas, and whether the reply made calls (its finish_reason is then "tool_calls")."""
        if self.calls_from is None:
            return self._content_up_to(len(self.text)), False
        calls = _parse_calls(self.text[self.calls_from:], self.call_format)
        if calls is None:  # not calls after all: the rest is content
            return self._content_up_to(len(self.text)), False
        deltas = []
        if len(calls) > self.num_calls_sent:
            deltas.append({"tool_calls": [self._call_delta(i, *calls[i]) for i in range(self.num_calls_sent, len(calls))]})
            self.num_calls_sent = len(calls)
        return deltas, True

    def _content_up_to(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent_content:
            return []
        chunk = self.text[self.sent_content:end]
        self.sent_content = end
        return [{"content": chunk}]

    def _possible_marker_prefix(self) -> int:
        """Characters at the end of the text that may begin the format's opening marker."""
        marker = {"hermes": _HERMES_OPEN, "mistral": _MISTRAL_OPEN}.get(self.call_format, _PYTHON_TAG)
        if self.call_format == "llama3_json" and not self.text.strip():
            return len(self.text)  # leading whitespace: the reply may still be a JSON call
        for size in range(min(len(marker) - 1, len(self.text)), 0, -1):
            if marker.startswith(self.text[-size:]):
                return size
        return 0

    def _complete_calls(self) -> list[tuple[str, Any]] | None:
        """The calls whose text is complete so far."""
        return _parse_calls(self.text[self.calls_from:], self.call_format)

    def _call_delta(self, index: int, name: str, arguments: Any) -> dict[str, Any]:
        return {"index": index, **_openai_call(name, arguments)}
