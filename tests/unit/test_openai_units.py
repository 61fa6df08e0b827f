"""Parts of the OpenAI front end that need no cluster: chat templates rendered exactly as
`transformers` renders them, request-field validation and bounds, JSON the parser refuses,
router error mapping, metrics exposition."""

from __future__ import annotations

import json

import grpc
import pytest

from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.openai.body import parse_json
from pdserve.openai.chat_template import ChatTemplate, normalize_messages
from pdserve.openai.limits import MAX_CONTENT_PARTS, MAX_MESSAGES, NumberTooLarge, short_repr
from pdserve.openai.metrics import Metrics
from pdserve.openai.prompts import read_prompts, render_and_tokenize
from pdserve.openai.protocol import OpenAIError, from_rpc_error
from pdserve.openai.sampling import Limits, read_sampling, to_proto

# Exercises what real checkpoints' templates use: namespace(), loop controls, tojson,
# raise_exception, bos/eos tokens, whitespace control and add_generation_prompt.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif %}{% endfor %}"
    "{% if ns.system %}<<SYS>>{{ ns.system | tojson }}<</SYS>>\n{% endif %}"
    "{% for m in messages %}\n"
    "  {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
    "  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}\n"
    "  [{{ m['role'] | upper }}] {{ m['content'] | trim }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "Be brief. Ünïcødé \"quotes\"."},
    {"role": "user", "content": "  Hello there  "},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "Tell me a story."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("openai-units") / "tiny", arch="llama", seed=0)


def _with_template(model_dir, tmp_path, template: str):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    out = tmp_path / "templated"
    out.mkdir()
    for f in model_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("template", ["checkpoint", "rich"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_and_tokenizes_as_transformers(model_dir, tmp_path, template, add_generation_prompt):
    import transformers

    directory = model_dir if template == "checkpoint" else _with_template(model_dir, tmp_path, RICH_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    want_text = hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    want_ids = hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True,
                                      return_dict=False)
    tokenizer = Tokenizer.from_dir(directory)
    ours = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    text = ours.render(normalize_messages(MESSAGES), add_generation_prompt)
    assert text == want_text
    assert tokenizer.encode(text, add_special_tokens=False) == list(want_ids)


def test_template_errors_and_sandbox_escapes_are_400s():
    template = ChatTemplate(RICH_TEMPLATE, "<s>", "</s>")
    with pytest.raises(OpenAIError) as bad_role:
        template.render([{"role": "tool", "content": "x"}])
    assert (bad_role.value.status, bad_role.value.param) == (400, "messages")
    assert "bad role tool" in bad_role.value.message
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", None, None)
    with pytest.raises(OpenAIError) as sandboxed:
        escape.render([{"role": "user", "content": "x"}])
    assert sandboxed.value.status == 400
    underscore = ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}", None, None)
    with pytest.raises(OpenAIError):
        underscore.render([{"role": "user", "content": "x"}])


def test_messages_are_validated_and_text_parts_joined():
    parts = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}])
    assert parts[0]["content"] == "a\nb"
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "hi"):
        with pytest.raises(OpenAIError) as error:
            normalize_messages(bad)
        assert (error.value.status, error.value.param) == (400, "messages")


LIMITS = Limits(max_model_len=128, max_n=16, max_logprobs=20)


def test_sampling_fields_map_to_the_router_message():
    fields = read_sampling({"max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
                            "min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": 0.5,
                            "frequency_penalty": -0.5, "seed": -1, "n": 3, "stop": "END",
                            "stop_token_ids": [2], "ignore_eos": True, "min_tokens": 2,
                            "logprobs": True, "top_logprobs": 4}, LIMITS, chat=True)
    msg = to_proto(fields)
    assert (msg.max_tokens, msg.top_k, msg.n, msg.logprobs, msg.min_tokens) == (7, 5, 3, 4, 2)
    assert msg.seed == 2**64 - 1 and list(msg.stop) == ["END"] and list(msg.stop_token_ids) == [2]
    assert msg.ignore_eos and abs(msg.temperature - 0.5) < 1e-6
    assert not msg.no_speculation
    assert to_proto(read_sampling({"no_speculation": True}, LIMITS, chat=False)).no_speculation
    assert to_proto(read_sampling({"logprobs": True}, LIMITS, chat=True)).logprobs == 0
    assert not to_proto(read_sampling({}, LIMITS, chat=False)).HasField("logprobs")


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 129}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"n": 17}, "n"), ({"n": True}, "n"), ({"logprobs": 21}, "logprobs"), ({"seed": 2**64}, "seed"),
    ({"stop": ["a"] * 17}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    # The protobuf field types: int32 top_k, uint32 stop_token_ids and min_tokens, uint64 seed.
    ({"top_k": 2**31}, "top_k"), ({"top_k": 1e300}, "top_k"), ({"stop_token_ids": [2**32]}, "stop_token_ids"),
    ({"min_tokens": 2**32}, "min_tokens"), ({"seed": -(2**63) - 1}, "seed"),
    ({"stop_token_ids": [1] * 1025}, "stop_token_ids"), ({"stop": ["a"] * 100_000}, "stop"),
    ({"temperature": 10**400}, "temperature"), ({"top_k": NumberTooLarge(5000)}, "top_k"),
    ({"temperature": NumberTooLarge(5000)}, "temperature"),
    # Below float32's smallest normal: would arrive as 0 or subnormal.
    ({"temperature": 1e-300}, "temperature"), ({"top_p": 1e-300}, "top_p"), ({"min_p": 5e-324}, "min_p"),
    ({"repetition_penalty": 1e-39}, "repetition_penalty"), ({"presence_penalty": -1e-300}, "presence_penalty"),
    ({"stop": ["a\ud800"]}, "stop"),
])
def test_bad_sampling_fields_are_400s_naming_the_field(body, param):
    with pytest.raises(OpenAIError) as error:
        to_proto(read_sampling(body, LIMITS, chat=False))
    assert (error.value.status, error.value.param) == (400, param)


def test_chat_top_logprobs_needs_logprobs():
    with pytest.raises(OpenAIError) as error:
        read_sampling({"top_logprobs": 2}, LIMITS, chat=True)
    assert error.value.param == "top_logprobs"


@pytest.mark.parametrize("code,status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.OUT_OF_RANGE, 400),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500),
])
def test_router_status_codes_become_http_statuses(code, status):
    error = from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "why"), "prompt")
    body = error.body()["error"]
    assert error.status == status and body["message"] == "why"
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == ("prompt" if code == grpc.StatusCode.OUT_OF_RANGE else None)


def test_metrics_text_counts_requests_and_buckets_durations():
    metrics = Metrics()
    metrics.observe_request("/v1/completions", 200, 0.02)
    metrics.observe_request("/v1/completions", 200, 3.0)
    metrics.observe_request("/v1/completions", 400, 0.001)
    metrics.count_tokens(7, 3)
    text = metrics.render().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['pdserve_openai_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert samples['pdserve_openai_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert samples['pdserve_openai_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.025"}'] == 2
    assert samples['pdserve_openai_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] == 3
    assert samples['pdserve_openai_request_duration_seconds_count{endpoint="/v1/completions"}'] == 3
    assert samples["pdserve_openai_requests_in_flight"] == 0
    assert samples["pdserve_openai_prompt_tokens_total"] == 7 and samples["pdserve_openai_completion_tokens_total"] == 3
    assert "# TYPE pdserve_openai_requests_total counter" in text
    assert "# TYPE pdserve_openai_request_duration_seconds histogram" in text
    assert "_created" not in text  # no series beyond the documented ones


def test_each_metrics_has_its_own_registry():
    """Two front ends in one process (as in the tests) count apart, off the global registry."""
    first, second = Metrics(), Metrics()
    first.observe_request("/v1/models", 200, 0.01)
    assert b'pdserve_openai_requests_total{endpoint="/v1/models",status="200"} 1.0' in first.render()
    assert b"/v1/models" not in second.render()


def test_small_normal_floats_and_zero_pass_through():
    msg = to_proto(read_sampling({"temperature": 1e-30, "min_p": 0.0, "presence_penalty": -0.0}, LIMITS, chat=False))
    assert msg.temperature > 0 and msg.min_p == 0


def test_stop_token_ids_must_be_in_the_vocabulary():
    limits = Limits(max_model_len=128, max_n=16, max_logprobs=20, vocab_size=512)
    assert list(to_proto(read_sampling({"stop_token_ids": [511]}, limits, chat=False)).stop_token_ids) == [511]
    with pytest.raises(OpenAIError) as error:
        read_sampling({"stop_token_ids": [512]}, limits, chat=False)
    assert error.value.param == "stop_token_ids"


def test_json_the_parser_refuses_is_a_400_naming_the_field():
    deep = b'{"n": 1, "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(OpenAIError) as error:
        parse_json(deep)
    assert (error.value.status, error.value.param) == (400, "prompt")
    with pytest.raises(OpenAIError) as error:
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    assert (error.value.status, error.value.param) == (400, None)
    # Integers too long for int() become NumberTooLarge, which the field's reader names.
    body = parse_json(b'{"max_tokens": ' + b"9" * 5000 + b', "prompt": [1, -' + b"1" * 5000 + b"]}")
    assert isinstance(body["max_tokens"], NumberTooLarge) and isinstance(body["prompt"][1], NumberTooLarge)
    with pytest.raises(OpenAIError) as error:
        read_sampling(body, LIMITS, chat=False)
    assert error.value.param == "max_tokens" and "5000 digits" in error.value.message
    with pytest.raises(OpenAIError) as error:
        read_prompts(body, 128, 512)
    assert error.value.param == "prompt"
    for bad in (b"{", b"\xff", b'{"a": 1,}'):
        with pytest.raises(OpenAIError) as error:
            parse_json(bad)
        assert error.value.status == 400
    assert parse_json(b'{"s": "\\ud83d\\ude00", "k": 12}') == {"s": "\U0001F600", "k": 12}


@pytest.mark.parametrize("prompt", [["x"] * 65, "y" * 1_000_001, "a\ud800", [[1, 2], "\udc00"], [5] * 128,
                                    [[5] * 200], [1, 2, 512], [1, True], [[]], [], 3, [{"a": 1}]])
def test_prompts_over_the_bounds_or_not_unicode_are_400s(prompt):
    with pytest.raises(OpenAIError) as error:
        read_prompts({"prompt": prompt}, 128, 512)
    assert (error.value.status, error.value.param) == (400, "prompt")


def test_prompts_within_the_bounds_pass():
    assert read_prompts({"prompt": [[5] * 127, "x" * 1000, "\U0001F600"]}, 128, 512) == [[5] * 127, "x" * 1000,
                                                                                          "\U0001F600"]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1),
    [{"role": "user", "content": [{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)}],
    [{"role": "user", "content": "z" * 1_000_001}],
    [{"role": "user", "content": "z" * 600_000}, {"role": "assistant", "content": "z" * 600_000}],
    [{"role": "user", "content": "hi", "name": "n" * 1_000_000}],
    [{"role": "user", "content": "a\ud800"}],
    [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
    [{"role": "user", "content": "hi", "name": "\ud800"}],
    [{"role": "user", "content": "hi", "tool_call_id": NumberTooLarge(5000)}],
    [{"role": "x" * 10**6, "content": "hi"}],
])
def test_messages_over_the_bounds_are_400s_before_any_template_runs(messages):
    with pytest.raises(OpenAIError) as error:
        normalize_messages(messages)
    assert (error.value.status, error.value.param) == (400, "messages")
    assert len(error.value.message) < 300  # nothing of the client's is echoed at length


def test_render_and_tokenize_gives_the_tokenizers_ids(model_dir):
    tokenizer = Tokenizer.from_dir(model_dir)
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    messages = normalize_messages(MESSAGES)
    ids = render_and_tokenize(template, tokenizer, messages, True, None)
    assert ids == tokenizer.encode(template.render(messages, True), add_special_tokens=False)
    with pytest.raises(OpenAIError) as error:  # a template that prints what normalize_messages never saw
        render_and_tokenize(template, tokenizer, [{"role": "user", "content": "\ud800"}], True, None)
    assert error.value.param == "messages"


def test_short_repr_never_raises_and_stays_short():
    for value in (10**4000, [10**4000], "x" * 10**6, [[[[[[[[1]]]]]]]], {"k": "v" * 1000}, NumberTooLarge(7)):
        assert len(short_repr(value)) < 100
