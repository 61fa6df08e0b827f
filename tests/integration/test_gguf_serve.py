"""`pdserve up --model FILE.gguf`: a whole cluster serves OpenAI chat from one GGUF file, with the chat
template the file carries and the name given by --served-model-name."""

from __future__ import annotations

import pytest

from helpers.gguf_files import write_gguf
from helpers.http_testing import call
from helpers.up_testing import OPENAI_LINE, pdserve_up, stop_up
from pdserve.llm import LLM
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.tiny_model import make_tiny_model
from pdserve.state.embedded_redis import free_port

# Not the checkpoint's own template: the reply must show that the file's template is the one applied.
FILE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[[{{ m['role'] }}]]: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[[assistant]]:{% endif %}")
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-serve")
    hf_dir = make_tiny_model(root / "hf", arch="llama", seed=0, size="tiny")
    return write_gguf(hf_dir, root / "tiny.gguf", "F32", chat_template=FILE_TEMPLATE)


def test_pdserve_up_serves_chat_from_a_gguf_file_with_its_chat_template(gguf_file):
    import transformers

    args = ("--model", str(gguf_file), "--port", "0", "--openai-port", str(free_port()),
            "--served-model-name", "tiny-gguf")
    with pdserve_up(*args, until=OPENAI_LINE) as (up, ready):
        address = ready.split()[3].removeprefix("http://").removesuffix("/v1")
        status, _, models = call(address, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-gguf"], models
        status, _, reply = call(address, "POST", "/v1/chat/completions", {
            "model": "tiny-gguf", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert status == 200, reply
        stop_up(up)

    # transformers renders the same file's template; pdserve in this process continues those ids.
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    prompt_ids = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert reference.decode(prompt_ids).endswith("[[assistant]]:")
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids)
    [expected] = LLM(str(gguf_file), threads=1).generate(
        prompt_ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert reply["choices"][0]["message"]["content"] == expected.samples[0].text
