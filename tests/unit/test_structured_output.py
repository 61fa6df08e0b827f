"""Structured outputs in the engine: every sample satisfies its constraint, at any temperature, in any
batch, and a continued request (after prefill or a failed server) goes on in the right grammar state."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from helpers.engine_testing import assert_no_leaks, greedy, one_torch_thread, random_prompt, run_with_arrivals
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.validation import RequestRejectedError
from pdserve.models.loader import load_model
from pdserve.models.sampling_params import SamplingParams, StructuredOutput
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer

BLOCK_SIZE = 16
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "size": {"enum": ["small", "medium", "large"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 999},
        "where": {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}},
                  "required": ["x"], "additionalProperties": False},
    },
    "required": ["name", "size", "score", "where"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        path = make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0, size="tiny",
                               train_steps=100)
        model, config = load_model(path)
        tokenizer = Tokenizer.from_dir(path)

        def engine(num_blocks: int = 512, **config_kwargs) -> LLMEngine:
            runner = ModelRunner(model, config, num_blocks, BLOCK_SIZE)
            return LLMEngine(runner, tokenizer, EngineConfig(block_size=BLOCK_SIZE, **config_kwargs))

        yield engine, tokenizer


def _json(schema) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema))


def test_sampled_json_always_validates_against_the_schema(tiny):
    make_engine, tokenizer = tiny
    engine = make_engine(max_num_seqs=32)
    prompt = tokenizer.encode("The keeper wrote in his logbook:")
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=11, n=8, structured=_json(SCHEMA))
    results = engine.generate([prompt] * 6, params)
    for result in results:
        for sample in result.samples:
            assert sample.finish_reason == "stop", sample.text
            jsonschema.validate(json.loads(sample.text), SCHEMA)
    # The same seed gives the same outputs.
    again = engine.generate([prompt], SamplingParams(max_tokens=120, temperature=1.0, seed=11, n=8,
                                                     structured=_json(SCHEMA)))[0]
    assert [s.text for s in again.samples] == [s.text for s in results[0].samples]
    assert_no_leaks(engine)


def test_regex_and_choice_hold_and_leave_unconstrained_neighbours_alone(tiny):
    make_engine, tokenizer = tiny
    rng = random.Random(4)
    regex = r"[0-9]{3}-[a-z]{2,5}"  # (not \d: Unicode digits differ between Rust's and Python's tables)
    choices = ["lighthouse", "keeper", "lens"]
    workload = []
    for i in range(24):
        structured = [StructuredOutput("regex", regex), StructuredOutput("choice", json.dumps(choices)), None][i % 3]
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=i, ignore_eos=structured is None,
                                structured=structured)
        workload.append((rng.randrange(5), random_prompt(rng, rng.randint(3, 30)), params))
    engine = make_engine(max_num_seqs=16, max_num_batched_tokens=64)
    results = run_with_arrivals(engine, workload)
    for i, (_, prompt, params) in enumerate(workload):
        text = results[f"r{i}"].samples[0].text
        if params.structured is None:
            alone = make_engine().generate([prompt], params)[0].samples[0].text
            assert text == alone, "an unconstrained request in a batch with constrained ones"
        elif params.structured.kind == "regex":
            assert re.fullmatch(regex, text), text
        else:
            assert text in choices
    assert_no_leaks(engine)


def test_a_continued_request_resumes_in_the_right_grammar_state(tiny):
    make_engine, tokenizer = tiny
    prompt = tokenizer.encode("The lamp was lit")
    params = SamplingParams(max_tokens=80, temperature=0.8, seed=5, n=2, structured=_json(SCHEMA))
    whole = make_engine().generate([prompt], params)[0]
    for cut in (1, 7):
        engine = make_engine()
        engine.add_prefilled_request("r", prompt, params, [s.token_ids[:cut] for s in whole.samples])
        texts = ["", ""]
        while engine.has_unfinished_requests():
            for out in engine.step():
                for delta in out.samples:
                    texts[delta.index] += delta.text
        assert texts == [s.text for s in whole.samples]


def test_continuing_with_tokens_outside_the_constraint_is_refused_and_frees_the_reservation(tiny):
    make_engine, tokenizer = tiny
    engine = make_engine()
    prompt = tokenizer.encode("Hello")
    engine.reserve("res", len(prompt))
    bad = tokenizer.encode("x", add_special_tokens=False)  # a JSON value cannot start with x
    with pytest.raises(RequestRejectedError, match="structured-output constraint"):
        engine.add_prefilled_request("r", prompt, SamplingParams(structured=StructuredOutput("json_object")), [bad],
                                     reservation_id="res")
    assert_no_leaks(engine)


@pytest.mark.parametrize("structured, message", [
    (StructuredOutput("json_schema", '{"type": 5}'), "type must be a string"),
    (StructuredOutput("json_schema", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
    (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutput("regex", "[a-"), "unclosed character class"),
    (StructuredOutput("grammar", "start: foo"), "unknown name"),
    (StructuredOutput("choice", "[]"), "non-empty list"),
])
def test_constraints_that_do_not_compile_are_refused_naming_the_problem(tiny, structured, message):
    make_engine, _ = tiny
    engine = make_engine()
    with pytest.raises(RequestRejectedError, match=re.escape(message)):
        engine.add_request("r", [1, 2, 3], greedy(4, structured=structured))
    assert not engine.has_unfinished_requests()


def test_grammars_in_lark_and_gbnf_hold(tiny):
    make_engine, tokenizer = tiny
    engine = make_engine()
    prompt = tokenizer.encode("The answer:")
    for spec in ('start: "yes" | "no" | "later"', 'root ::= "yes" | "no" | "later"'):
        result = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=2, n=6,
                                                          structured=StructuredOutput("grammar", spec)))[0]
        assert all(s.text in ("yes", "no", "later") and s.finish_reason == "stop" for s in result.samples)
    assert_no_leaks(engine)
