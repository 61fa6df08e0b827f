"""Tool-call formats: a reply parsed whole and streamed gives the same calls and content."""

from __future__ import annotations

import json

import pytest

from pdserve.openai.protocol import OpenAIError
from pdserve.openai.tools import ToolCallStream, format_of_template, parse_reply, read_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

REPLIES = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]',
}


@pytest.mark.parametrize("call_format", sorted(REPLIES))
def test_a_reply_parses_into_calls_whole_and_streamed(call_format):
    reply = parse_reply(REPLIES[call_format], call_format)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls]
    assert calls == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert reply.content == ("Let me check." if call_format == "hermes" else None)
    for piece in (1, 3, 7):  # token-sized pieces
        stream, deltas = ToolCallStream(call_format), []
        text = REPLIES[call_format]
        for i in range(0, len(text), piece):
            deltas += stream.push(text[i:i + piece])
        last, made_calls = stream.finish()
        deltas += last
        assert made_calls
        content = "".join(d.get("content", "") for d in deltas)
        assert content.strip() == (reply.content or "")
        streamed = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [c["index"] for c in streamed] == [0, 1]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == calls


@pytest.mark.parametrize("call_format", sorted(REPLIES))
def test_plain_text_and_broken_calls_stay_content(call_format):
    for text in ("The weather is fine.", {"hermes": "<tool_call>{not json</tool_call>", "mistral": "[TOOL_CALLS][{",
                                          "llama3_json": "{\"name\": 3}"}[call_format]):
        assert parse_reply(text, call_format).content == text
        stream = ToolCallStream(call_format)
        deltas = stream.push(text)
        last, made_calls = stream.finish()
        assert not made_calls and "".join(d["content"] for d in deltas + last) == text


def test_templates_name_their_format():
    assert format_of_template("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert format_of_template("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert format_of_template("{% if tools %}<|start_header_id|>ipython{% endif %}") == "llama3_json"
    assert format_of_template("{{ messages }}") is None


@pytest.mark.parametrize("body, param", [
    ({"tools": "x"}, "tools"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"), ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
])
def test_bad_tools_are_400s_naming_the_field(body, param):
    with pytest.raises(OpenAIError) as error:
        read_tools(body)
    assert error.value.status == 400 and error.value.param == param


def test_tool_choice_reads():
    assert read_tools({}) is None
    assert read_tools({"tools": [WEATHER, TIME]}).choice == "auto"
    named = read_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert named.forced and named.allowed() == ["get_time"]
    assert read_tools({"tools": [WEATHER, TIME], "tool_choice": "required"}).allowed() == ["get_weather", "get_time"]


@pytest.mark.parametrize("call_format, text", [
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call> and then some words'),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> x <tool_call>{"name": "a", '
               '"arguments": {}}</tool_call>'),
    ("llama3_json", '{"name": "get_time", "parameters": {}} trailing prose'),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {}}] done.'),
])
def test_text_after_the_calls_is_dropped_alike_whole_and_streamed(call_format, text):
    whole = parse_reply(text, call_format)
    assert [c["function"]["name"] for c in whole.tool_calls] == ["get_time"]
    stream, deltas = ToolCallStream(call_format), []
    for i in range(0, len(text), 2):
        deltas += stream.push(text[i:i + 2])
    last, made_calls = stream.finish()
    streamed = [c for d in deltas + last for c in d.get("tool_calls", [])]
    assert made_calls and [c["function"]["name"] for c in streamed] == ["get_time"]
    assert "".join(d.get("content", "") for d in deltas + last).strip() == (whole.content or "")
