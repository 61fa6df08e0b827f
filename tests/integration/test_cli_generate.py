"""`pdserve make-tiny-model` and in-process `pdserve generate`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from pdserve.llm import LLM
from pdserve.models.sampling_params import SamplingParams


def pdserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_make_tiny_model_then_generate_json_matches_the_python_api(tmp_path):
    model = tmp_path / "tiny"
    made = pdserve("make-tiny-model", str(model), "--arch", "qwen2", "--seed", "5")
    assert made.returncode == 0, made.stderr
    out = pdserve("generate", "--model", str(model), "Hello there", "--max-tokens", "12",
                  "--temperature", "0", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    [completion] = [json.loads(line) for line in out.stdout.splitlines()]
    [expected] = LLM(str(model), threads=1).generate(
        "Hello there", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert completion["token_ids"] == expected.samples[0].token_ids
    assert completion["text"] == expected.samples[0].text
    assert completion["finish_reason"] == "length"


def test_streamed_text_is_the_full_decode(tmp_path):
    model = tmp_path / "tiny"
    assert pdserve("make-tiny-model", str(model)).returncode == 0
    out = pdserve("generate", "--model", str(model), "Once", "--max-tokens", "20", "--seed", "1",
                  "--ignore-eos")
    assert out.returncode == 0, out.stderr
    llm = LLM(str(model), threads=1)
    [expected] = llm.generate("Once", SamplingParams(max_tokens=20, seed=1, ignore_eos=True))
    assert out.stdout == expected.samples[0].text
    assert expected.samples[0].text == llm.tokenizer.decode(expected.samples[0].token_ids)


def test_bad_input_is_one_clear_line(tmp_path):
    out = pdserve("generate", "--model", str(tmp_path / "missing"), "hi")
    assert out.returncode == 2 and "no such file or directory" in out.stderr and "Traceback" not in out.stderr
    model = tmp_path / "tiny"
    assert pdserve("make-tiny-model", str(model)).returncode == 0
    out = pdserve("generate", "--model", str(model), "hi", "--temperature", "-1")
    assert out.returncode == 2 and "temperature must be in [0, 100]" in out.stderr
