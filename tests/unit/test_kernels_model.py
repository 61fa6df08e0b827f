"""The whole tiny model run through the Triton kernels (pdserve.kernels.ops forced to Triton: the
interpreter on the CPU) against the reference ops: a mixed prefill step then decode steps, with
a float and an int8 KV cache."""

from __future__ import annotations

import pytest
import torch

from helpers.engine_testing import one_torch_thread  # noqa: E402
from helpers.kernel_testing import DEVICE  # first: sets TRITON_INTERPRET
from pdserve.engine.model_runner import ModelRunner, ScheduledChunk  # noqa: E402
from pdserve.kernels import ops  # noqa: E402
from pdserve.models.loader import load_model  # noqa: E402
from pdserve.models.tiny_model import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny_qwen_kernels"), arch="qwen2", seed=0, size="tiny")
    return load_model(path, dtype=torch.float32, device=DEVICE)


def run_steps(model, config, kv_dtype):
    """A step with a whole prompt and a prompt's first chunk, a step with the rest of that prompt
    (over its cached prefix), then 3 decode steps (crossing blocks of 4); logits of each."""
    runner = ModelRunner(model, config, 12, 4, kv_dtype)
    prompts = [list(range(5, 18)), list(range(40, 49))]
    tables = [[7, 2, 9, 0, 11], [4, 1, 8, 5]]
    # step 1: prompt 0 whole and the first 5 tokens of prompt 1; step 2: the rest of prompt 1
    logits = [runner.execute([ScheduledChunk(0, prompts[0], 0, tables[0], True),
                              ScheduledChunk(1, prompts[1][:5], 0, tables[1], False)])]
    logits.append(runner.execute([ScheduledChunk(1, prompts[1][5:], 5, tables[1], True)]))
    tokens = [int(logits[0][0].argmax()), int(logits[1][0].argmax())]
    for step in range(3):
        chunks = [ScheduledChunk(i, [tokens[i]], len(prompts[i]) + step, tables[i], True) for i in range(2)]
        logits.append(runner.execute(chunks))
        tokens = [int(row.argmax()) for row in logits[-1]]
    return logits


@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["float", "int8"])
def test_model_through_triton_kernels_matches_reference_ops(tiny, kv_dtype, monkeypatch):
    model, config = tiny  # qwen2 tiny: q/k/v bias, 6 query heads over 2 KV heads (GQA 3)
    with one_torch_thread():
        monkeypatch.setattr(ops, "BACKEND", "reference")
        want = run_steps(model, config, kv_dtype)
        monkeypatch.setattr(ops, "BACKEND", "triton")
        got = run_steps(model, config, kv_dtype)
    # int8: float noise of 1e-7 between the paths flips values sitting on a rounding boundary by
    # one step, which moves logits by ~1e-3
    tol = 2e-4 if kv_dtype is None else 1e-2
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w.cpu(), atol=tol, rtol=tol)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_backend_choice_follows_the_device(monkeypatch):
    monkeypatch.setattr(ops, "BACKEND", "auto")
    assert not ops.use_triton(torch.zeros(1))
    assert ops.use_triton(torch.zeros(1, device="cuda")) if torch.cuda.is_available() else True
    monkeypatch.setattr(ops, "BACKEND", "reference")
    assert not ops.use_triton(torch.zeros(1, device=DEVICE))
