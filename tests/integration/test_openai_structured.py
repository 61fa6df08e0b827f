"""Structured outputs and tool calls through a real cluster (1 prefill + 1 decode, the router, `serve openai`),
driven by the official `openai` client: JSON schemas, regexes and choices hold in every sample, tool calls come
back parsed in each supported format (streamed and not), and bad constraints are 400s naming their field."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

from pdserve.cli.cluster import LocalCluster
from pdserve.models.tiny_model import make_tiny_model
from pdserve.v1 import router_pb2, router_pb2_grpc

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "size": {"enum": ["small", "medium", "large"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 999},
        "where": {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                   "y": {"type": "number", "minimum": -10, "maximum": 10}},
                  "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["name", "size", "score", "where"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe the lighthouse keeper as JSON."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]

# Minimal chat templates in each tool-call format (the shapes of Qwen2/Hermes, Llama 3.1 and Mistral's).
TEMPLATES = {
    "hermes": (
        "{% if tools %}<|im_start|>system\nCall functions as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>"
        "\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}"
        "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
        " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3_json": (
        "<|begin_of_text|>{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Answer with {\"name\": function name, \"parameters\": arguments}.\n{% for t in tools %}{{ t | tojson }}\n"
        "{% endfor %}<|eot_id|>{% endif %}{% for m in messages %}{% if m.role == 'tool' %}"
        "<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% else %}"
        "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}{% endfor %}{% else %}"
        "{{ m.content }}{% endif %}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": (
        "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{% for m in messages %}"
        "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]{% elif m.role == 'tool' %}[TOOL_RESULTS]"
        "{{ m.content }}[/TOOL_RESULTS]{% elif m.role == 'assistant' %}{% if m.tool_calls %}[TOOL_CALLS]"
        "{{ m.tool_calls | map(attribute='function') | list | tojson }}{% else %}{{ m.content }}{% endif %}</s>"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("structured") / "tiny", arch="llama", seed=0,
                               train_steps=100))


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    with LocalCluster(model_dir, prefill=1, decode=1, openai=True) as c:
        c.tool_servers = {}
        for call_format, template in TEMPLATES.items():
            copy = tmp_path_factory.mktemp(call_format) / "tiny"
            shutil.copytree(model_dir, copy)
            config = json.loads((copy / "tokenizer_config.json").read_text())
            (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
            c.tool_servers[call_format] = c.add_openai_server(["--model-name", model_dir], model_dir=str(copy)).address
        yield c


def _client(address: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(cluster):
    with _client(cluster.openai_address) as c:
        yield c


def test_200_sampled_json_schema_outputs_all_validate(client, model_dir):
    def request(seed: int):
        return client.chat.completions.create(
            model=model_dir, messages=MESSAGES, temperature=1.0, n=8, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "keeper", "schema": SCHEMA, "strict": True}})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(request, range(25)))
    texts = [choice.message.content for response in responses for choice in response.choices]
    assert len(texts) == 200
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 100, "temperature 1 should give varied outputs"
    streamed = client.chat.completions.create(
        model=model_dir, messages=MESSAGES, temperature=1.0, seed=0, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "keeper", "schema": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == responses[0].choices[0].message.content
    # Any JSON object: a weak model's free-form keys may run to max_tokens, so only a finished one must parse.
    anything = client.completions.create(model=model_dir, prompt="Data:", max_tokens=100, temperature=1.0, seed=3,
                                         n=8, extra_body={"response_format": {"type": "json_object"}})
    for choice in anything.choices:
        assert choice.text.startswith("{")
        assert choice.finish_reason == "length" or isinstance(json.loads(choice.text), dict), choice


def test_regex_and_choice_hold_in_200_of_200(client, model_dir):
    regex = r"[A-Z][a-z]{1,6}-[0-9]{2,4}"
    choices = ["north", "south", "east", "west"]

    def request(args):
        seed, constraint = args
        return client.completions.create(model=model_dir, prompt="The keeper turned", max_tokens=16, n=8,
                                         temperature=1.0, seed=seed, extra_body={"structured_outputs": constraint})

    work = [(seed, {"regex": regex}) for seed in range(25)] + [(seed, {"choice": choices}) for seed in range(25)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(request, work))
    regex_texts = [c.text for r in responses[:25] for c in r.choices]
    choice_texts = [c.text for r in responses[25:] for c in r.choices]
    assert len(regex_texts) == len(choice_texts) == 200
    assert all(re.fullmatch(regex, t) for t in regex_texts), [t for t in regex_texts if not re.fullmatch(regex, t)]
    assert all(t in choices for t in choice_texts) and len(set(choice_texts)) > 1
    legacy = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=8,
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert legacy.choices[0].message.content in ("yes", "no")


def _calls(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]


def _check_call(name: str, arguments: dict) -> None:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    jsonschema.validate(arguments, schema)


@pytest.mark.parametrize("call_format", sorted(TEMPLATES))
def test_tool_calls_come_back_parsed_streamed_and_not(cluster, model_dir, call_format):
    with _client(cluster.tool_servers[call_format]) as client:
        for seed in range(6):
            response = client.chat.completions.create(
                model=model_dir, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
                tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
            choice = response.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
            for name, arguments in _calls(choice):
                _check_call(name, arguments)
            assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
        named = client.chat.completions.create(
            model=model_dir, messages=[{"role": "user", "content": "What time is it?"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60)
        assert [name for name, _ in _calls(named.choices[0])] == ["get_time"]
        assert named.choices[0].finish_reason == "stop"  # as OpenAI ends a reply to a named tool_choice
        # Streamed: the calls arrive as deltas that add up to the non-streamed reply's.
        stream = client.chat.completions.create(
            model=model_dir, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
            tool_choice="required", temperature=1.0, seed=0, max_tokens=120, stream=True)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            for delta_call in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
                call["name"] += delta_call.function.name or ""
                call["arguments"] += delta_call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        whole = client.chat.completions.create(
            model=model_dir, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
            tool_choice="required", temperature=1.0, seed=0, max_tokens=120)
        assert finish == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == _calls(whole.choices[0])
        # A conversation carrying a call and its result renders, and "none" answers in text.
        call = whole.choices[0].message.tool_calls[0]
        follow = [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "{\"temperature\": 4}"}]
        reply = client.chat.completions.create(model=model_dir, messages=follow, tools=TOOLS, tool_choice="none",
                                               max_tokens=8, extra_body={"ignore_eos": True})
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
        auto = client.chat.completions.create(model=model_dir, messages=follow, tools=TOOLS, max_tokens=8)
        assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kwargs, param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
     "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}), "response_format"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(extra_body={"structured_outputs": {"regex": "[a-"}}), "structured_outputs"),
    (dict(extra_body={"guided_grammar": "start: nothing_here"}), "guided_grammar"),
    (dict(extra_body={"guided_choice": []}), "guided_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch_rocket"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "x", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "format": "no-such-format"}}}}}], tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}), "guided_regex"),
])
def test_bad_constraints_are_400s_naming_the_field_and_the_server_keeps_serving(cluster, model_dir, kwargs, param):
    with _client(cluster.tool_servers["hermes"]) as client:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=4, **kwargs)
        assert error.value.param == param, error.value.response.json()
        assert client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=2).choices


def test_the_grpc_api_takes_a_constraint_and_refuses_a_bad_one(cluster):
    request = router_pb2.GenerateRequest(prompt="The keeper", sampling=router_pb2.SamplingParams(
        max_tokens=12, temperature=1.0, seed=1, structured_output=router_pb2.StructuredOutput(
            choice=router_pb2.StringList(values=["lamp", "lens"]))))
    with cluster.channel(cluster.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        text = "".join(r.chunk.text for r in stub.Generate(request, timeout=60) if r.HasField("chunk"))
        assert text in ("lamp", "lens")
        bad = router_pb2.GenerateRequest(prompt="x", sampling=router_pb2.SamplingParams(
            structured_output=router_pb2.StructuredOutput(regex="(")))
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(bad, timeout=60))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured output" in error.value.details()
