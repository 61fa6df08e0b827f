"""The generated checkpoints load in transformers, run, and are byte-for-byte reproducible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pdserve.models.tiny_model import ARCHITECTURES, SHAPES, build_config, make_tiny_model
from pdserve.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PROMPTS = ("The lighthouse at Garrow Point", "def count_words(text):", "東京 Tokyo and café")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per architecture, seed 0."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHITECTURES}


def _load(directory: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loads_in_transformers_and_runs(tiny_dirs: dict[str, Path], arch: str) -> None:
    directory = tiny_dirs[arch]
    assert sorted(p.name for p in directory.iterdir()) == sorted(FILES)
    model = _load(directory)
    config = json.loads((directory / "config.json").read_text())
    assert type(model).__name__ == ARCHITECTURES[arch] == config["architectures"][0]
    tok = Tokenizer.from_dir(directory)
    assert config["vocab_size"] == tok.vocab_size
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_architecture_specific_fields(tiny_dirs: dict[str, Path]) -> None:
    llama = _load(tiny_dirs["llama"])
    assert llama.config.tie_word_embeddings
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    qwen = _load(tiny_dirs["qwen2"])
    assert not qwen.config.tie_word_embeddings
    with safe_open(str(tiny_dirs["qwen2"] / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        bias = f.get_tensor("model.layers.0.self_attn.k_proj.bias")
    assert torch.equal(qwen.model.layers[0].self_attn.k_proj.bias.detach(), bias)
    mistral = _load(tiny_dirs["mistral"])
    assert mistral.config.sliding_window is None
    assert mistral.config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_output_depends_on_the_prompt(tiny_dirs: dict[str, Path], arch: str) -> None:
    """Random weights must not collapse to repeating one token, or parity tests would prove little."""
    model = _load(tiny_dirs[arch])
    tok = Tokenizer.from_dir(tiny_dirs[arch])
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs.append(tuple(out[0, ids.shape[1] :].tolist()))
    assert len(set(outputs)) == len(PROMPTS)
    for generated in outputs:
        assert len(set(generated)) >= 8, generated


def test_same_seed_gives_identical_files(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", arch="qwen2", seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_dirs["qwen2"] / name).read_bytes(), name


def test_other_seed_changes_only_the_weights(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other", arch="llama", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dirs["llama"] / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (tiny_dirs["llama"] / name).read_bytes(), name


def test_identical_in_a_fresh_process(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Tokenizer training and weight init must not depend on hash seeds or thread counts."""
    out = tmp_path / "fresh"
    code = f"from pdserve.models.tiny_model import make_tiny_model; make_tiny_model({str(out)!r}, arch='mistral', seed=0)"
    env = dict(os.environ, PYTHONHASHSEED="123", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    for name in FILES:
        assert (out / name).read_bytes() == (tiny_dirs["mistral"] / name).read_bytes(), name


def test_small_size_loads(tmp_path: Path) -> None:
    directory = make_tiny_model(tmp_path / "small", arch="llama", seed=3, size="small")
    model = _load(directory)
    assert model.config.hidden_size == 256 and model.config.vocab_size == 1024
    with torch.no_grad():
        assert model(torch.tensor([[0, 5, 9]])).logits.shape == (1, 3, 1024)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_base_size_is_about_100m_parameters(arch: str) -> None:
    config = build_config(arch, "base", vocab_size=2048, bos_token_id=0, eos_token_id=1)
    shape = SHAPES[(arch, "base")]
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    per_layer = config["hidden_size"] * (2 * q + 2 * kv + 3 * config["intermediate_size"])
    total = config["num_hidden_layers"] * per_layer + 2048 * config["hidden_size"]
    assert 80e6 < total < 130e6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"arch": "gpt2"}, "arch"), ({"size": "huge"}, "size"), ({"seed": -1}, "seed"), ({"seed": "0"}, "seed")],
)
def test_bad_arguments_are_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_tiny_model(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
