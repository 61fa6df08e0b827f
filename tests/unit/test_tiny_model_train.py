"""make-tiny-model's training option: the training forward is the served network, training
lowers the loss deterministically, and the CLI flag and bad values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer as BackendTokenizer

from helpers.engine_testing import one_torch_thread
from helpers.paged_generation import greedy_paged
from pdserve.cli import main as pdserve_main
from pdserve.engine.model_runner import ModelRunner
from pdserve.models.config import ModelConfig
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tiny_model_train import TRAIN_TEXT_TOKENS, forward_logits, train_weights, training_tokens


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("train_llama"), arch="llama")


def checkpoint(path):
    """(weights under HF names, ModelConfig, the training text [N]) of a written checkpoint."""
    text = training_tokens(BackendTokenizer.from_file(str(path / "tokenizer.json")))
    return load_file(str(path / "model.safetensors")), ModelConfig.from_dir(path), text


def loss_on(weights, config, text: torch.Tensor) -> float:
    """Next-token cross-entropy over the first 4 windows of 128 tokens of text."""
    batch = text[: 4 * 129].view(4, 129)
    with torch.no_grad():
        logits = forward_logits(weights, config, batch[:, :-1])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied head / q-k-v biases and untied head
def test_training_forward_equals_the_served_model(tmp_path, llama_dir, arch):
    path = llama_dir if arch == "llama" else make_tiny_model(tmp_path / arch, arch=arch)
    weights, config, text = checkpoint(path)
    prompt = text[:80]  # crosses the llama3 rope scaling's changed positions (>= 64)
    model, served_config = load_model(path, dtype=torch.float32)
    with one_torch_thread():
        [served], _ = greedy_paged(ModelRunner(model, served_config, 8, 16), [prompt.tolist()], 1,
                                   [[0, 1, 2, 3, 4, 5]])
        mine = forward_logits(weights, config, prompt[None])[0]
    torch.testing.assert_close(mine, served, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_and_is_deterministic(llama_dir):
    weights, config, text = checkpoint(llama_dir)
    assert text.numel() == TRAIN_TEXT_TOKENS
    before = {name: t.clone() for name, t in weights.items()}
    trained, last_loss = train_weights(weights, config, text, 40, seed=3)
    again, again_loss = train_weights(weights, config, text, 40, seed=3)
    other, _ = train_weights(weights, config, text, 40, seed=4)
    assert all(torch.equal(weights[n], before[n]) for n in weights)  # the start is not modified
    assert all(torch.equal(trained[n], again[n]) for n in trained) and last_loss == again_loss
    assert not torch.equal(trained["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert loss_on(trained, config, text) < loss_on(weights, config, text) - 0.5


def test_cli_train_steps_writes_trained_weights(tmp_path, llama_dir, capsys):
    assert pdserve_main(["make-tiny-model", str(tmp_path / "m"), "--train-steps", "5"]) == 0
    assert "trained 5 steps" in capsys.readouterr().out
    trained, _, _ = checkpoint(tmp_path / "m")
    random_weights, _, _ = checkpoint(llama_dir)
    assert trained.keys() == random_weights.keys()
    assert not torch.equal(trained["model.norm.weight"], random_weights["model.norm.weight"])
    assert (tmp_path / "m" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_bad_train_steps_are_clear_errors(tmp_path, steps):
    with pytest.raises(ValueError, match="train_steps must be an int >= 0"):
        make_tiny_model(tmp_path / "bad", train_steps=steps)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="train steps must be an int >= 0"):
        train_weights({}, None, torch.arange(200), steps, 0)
