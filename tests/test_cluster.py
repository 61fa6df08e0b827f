"""The cluster as real processes: embedded Redis, workers and router, driven through Router/Generate."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from models.tiny_model import make_tiny_model
from models.tokenizer import Tokenizer
from protos.pdserve.v1 import router_pb2, router_pb2_grpc
from services.cluster import LocalCluster

NUM_REQUESTS = 64
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("cluster") / "tiny", arch="llama", seed=0))


def _prompts(n: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, 500, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def _hf_greedy(model_dir, prompts, max_tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


async def _generate_all(address, prompts, max_tokens):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(prompt):
            request = router_pb2.GenerateRequest(
                prompt_token_ids=router_pb2.TokenIds(ids=prompt),
                sampling=router_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            tokens, text, finish = [], "", None
            async for response in stub.Generate(request, timeout=300):
                if response.HasField("chunk"):
                    tokens += list(response.chunk.token_ids)
                    text += response.chunk.text
                else:
                    finish = response.complete
            return tokens, text, finish

        return await asyncio.gather(*(one(p) for p in prompts))


def _check_against_transformers(model_dir, prompts, results):
    tokenizer = Tokenizer.from_dir(model_dir)
    expected = _hf_greedy(model_dir, prompts, MAX_TOKENS)
    for (tokens, text, finish), want in zip(results, expected):
        assert tokens == want
        assert text == tokenizer.decode(tokens)
        assert finish.finish_reason == "length" and finish.completion_tokens == MAX_TOKENS


def test_colocated_worker_through_router_matches_transformers(model_dir):
    prompts = _prompts(16)
    with LocalCluster(model_dir, prefill=0, decode=0, colocated=1) as cluster:
        results = asyncio.run(_generate_all(cluster.router_address, prompts, MAX_TOKENS))
    _check_against_transformers(model_dir, prompts, results)
