"""Checkpoint loading: sharded files, dtypes, and one clear message for each kind of broken checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.hf_checkpoints import write_hf_checkpoint
from pdserve.models.config import ModelLoadError
from pdserve.models.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _forward_logits(model, ids):
    from pdserve.engine.model_runner import ModelRunner, ScheduledChunk

    runner = ModelRunner(model, model.config, num_blocks=4, block_size=16)
    return runner.execute([ScheduledChunk(0, ids, 0, [0, 1], True)])


def test_sharded_checkpoint_equals_single_file(hf_checkpoint, tmp_path):
    single, _ = load_model(hf_checkpoint("qwen2"))
    sharded_dir = write_hf_checkpoint(tmp_path / "sharded", "qwen2", max_shard_size="100KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded, _ = load_model(sharded_dir)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_in_their_dtype(tmp_path, dtype):
    model_dir = write_hf_checkpoint(tmp_path / "half", "llama", dtype=dtype)
    model, config = load_model(model_dir)
    assert config.dtype == dtype and model.embed_tokens.weight.dtype == dtype
    logits = _forward_logits(model, [1, 2, 3, 4])
    assert torch.isfinite(logits).all()


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    model_dir = _copy(hf_checkpoint("llama"), tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_model(model_dir)


def test_wrong_shape_names_file_key_and_shapes(hf_checkpoint, tmp_path):
    model_dir = _copy(hf_checkpoint("llama"), tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj"
                                             r"\.weight' has shape \(7, 64\), expected \(160, 64\)"):
        load_model(model_dir)


def test_unknown_architecture_is_refused(hf_checkpoint, tmp_path):
    model_dir = _copy(hf_checkpoint("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json: architectures=\['GPT2LMHeadModel'\] is not supported"):
        load_model(model_dir)


def test_truncated_safetensors_is_named(hf_checkpoint, tmp_path):
    model_dir = _copy(hf_checkpoint("llama"), tmp_path / "m")
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated safetensors file"):
        load_model(model_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), r"missing required key 'hidden_size'"),
    (lambda c: c.update(num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), r"rope_scaling type 'yarn'"),
    (lambda c: c.update(vocab_size=-5), r"'vocab_size' must be a positive integer"),
])
def test_bad_config_is_named(hf_checkpoint, tmp_path, edit, message):
    model_dir = _copy(hf_checkpoint("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_dir)


def test_missing_directory_contents(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(tmp_path)
