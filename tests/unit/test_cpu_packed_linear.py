"""Packed linear layers on the CPU (models/cpu_packed_linear.py): a bfloat16 model's layers are
packed by the model runner for the native kernel or oneDNN (oneDNN's give the same greedy tokens and
logits bit-identical on AVX-512 BF16 CPUs, within one bfloat16 rounding elsewhere; the native kernel's
are tested in test_cpu_native.py); float32 models and a tied
output head are left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.engine_testing import greedy, one_torch_thread
from pdserve.cli.flags import CPU_LINEAR_BACKENDS as FLAG_CHOICES
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, ScheduledChunk
from pdserve.kernels.cpu_native import native_kernels
from pdserve.models.cpu_packed_linear import (
    CPU_LINEAR_BACKENDS,
    NativePackedEmbedding,
    NativePackedLinear,
    PackedLinear,
    pack_linears_for_cpu,
    packing_available,
)
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")
BLOCK_SIZE = 16
BACKENDS = [pytest.param("onednn"),
            pytest.param("native", marks=pytest.mark.skipif(native_kernels() is None, reason="no native kernels"))]
LAYER_TYPES = {"onednn": PackedLinear, "native": NativePackedLinear}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Qwen2: q/k/v biases and an untied output head."""
    return make_tiny_model(tmp_path_factory.mktemp("packed") / "qwen2", arch="qwen2", seed=0, size="tiny")


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """Llama: the output head is the embedding."""
    return make_tiny_model(tmp_path_factory.mktemp("packed") / "llama", arch="llama", seed=0, size="tiny")


def engine_for(model_dir, backend: str) -> tuple[LLMEngine, ModelRunner]:
    model, config = load_model(model_dir, dtype=torch.bfloat16)
    runner = ModelRunner(model, config, 64, BLOCK_SIZE, cpu_linear=backend)
    engine = LLMEngine(runner, Tokenizer.from_dir(model_dir), EngineConfig(block_size=BLOCK_SIZE))
    return engine, runner


def packed_layers(model, backend: str = "onednn"):
    return [m for m in model.modules() if isinstance(m, LAYER_TYPES[backend])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_runner_packs_every_bfloat16_layer(tiny_dir, backend):
    runner = engine_for(tiny_dir, backend)[1]
    model = runner.model
    assert runner.packed_linears == len(packed_layers(model, backend))
    assert len(packed_layers(model, backend)) == 4 * model.config.num_layers + 1  # + the output head
    assert model.layers[0].self_attn.qkv_proj.bias is not None  # qwen2's q/k/v biases kept


def test_auto_prefers_the_native_kernel_and_unknown_backends_are_refused(tiny_dir):
    model = engine_for(tiny_dir, "auto")[1].model
    assert len(packed_layers(model, "native" if native_kernels() is not None else "onednn")) > 0
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown CPU linear backend"):
        pack_linears_for_cpu(model, "mkl")
    assert FLAG_CHOICES == CPU_LINEAR_BACKENDS  # the --cpu-linear flag's choices (kept torch-free)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_shared_by_two_runners_is_packed_once(tiny_dir, backend):
    model, config = load_model(tiny_dir, dtype=torch.bfloat16)
    first = ModelRunner(model, config, 8, BLOCK_SIZE, cpu_linear=backend)
    second = ModelRunner(model, config, 8, BLOCK_SIZE, cpu_linear=backend)
    assert first.packed_linears == second.packed_linears == len(packed_layers(model, backend)) > 0


def test_a_tied_output_head_is_not_packed_for_onednn(tied_dir):
    model = engine_for(tied_dir, "onednn")[1].model
    assert len(packed_layers(model)) == 4 * model.config.num_layers
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.skipif(native_kernels() is None, reason="no native kernels")
def test_a_tied_output_head_is_packed_once_for_the_native_kernel_and_read_by_the_embedding(tied_dir):
    model, _ = load_model(tied_dir, dtype=torch.bfloat16)
    table, head = model.embed_tokens.weight.detach().clone(), model.lm_head
    x = torch.randn(5, head.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = head(x)
    assert pack_linears_for_cpu(model, "native") == 4 * model.config.num_layers + 1
    assert isinstance(model.embed_tokens, NativePackedEmbedding) and isinstance(model.lm_head, NativePackedLinear)
    assert model.embed_tokens.packed_weight is model.lm_head.packed_weight
    ids = torch.tensor([[0, 5, table.shape[0] - 1], [31, 32, 33]])
    assert torch.equal(model.embed_tokens(ids), table[ids])
    got = model.lm_head(x)
    assert ((got.double() - expected.double()).abs() <= 2.0 ** -7 * expected.double().abs() + 1e-3).all()
    with pytest.raises(IndexError, match="out of range"):
        model.embed_tokens(torch.tensor([table.shape[0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_models_are_not_packed(tiny_dir, backend):
    model, _ = load_model(tiny_dir, dtype=torch.float32)
    assert pack_linears_for_cpu(model, backend) == 0
    assert not any(isinstance(m, (PackedLinear, NativePackedLinear)) for m in model.modules())


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_packed_layer_output_is_bit_identical(tiny_dir, rows):
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    layer = model.layers[1].mlp.gate_up_proj
    packed = PackedLinear.pack(layer)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    assert torch.equal(packed(x), layer(x))


def test_packed_engine_gives_the_same_logits_and_tokens(tiny_dir):
    prompts = [[5, 17, 99, 3, 250], list(range(10, 60)), [400] * 20]
    tokens, logits = {}, {}
    with one_torch_thread():
        for pack in (False, True):
            engine, runner = engine_for(tiny_dir, "onednn" if pack else "none")
            assert (runner.packed_linears > 0) == pack
            chunk = ScheduledChunk(0, prompts[1], 0, list(range(4)), needs_logits=True)
            logits[pack] = runner.execute([chunk])
            results = engine.generate(prompts, greedy(24))
            tokens[pack] = [r.samples[0].token_ids for r in results]
    # Bit-identical on the AVX-512 BF16 machines; on a CPU without them oneDNN's packed and plain kernels
    # may round a bfloat16 output apart by one unit in the last place (seen: 1 logit of 512, 1.2e-4).
    difference = (logits[True] - logits[False]).abs()
    one_ulp = logits[False].abs() * 2.0 ** -7  # >= one bfloat16 unit in the last place of each value
    assert bool((difference <= one_ulp).all()), difference.max()
    if "avx512_bf16" in _cpu_flags():
        assert torch.equal(logits[True], logits[False])
    assert tokens[True] == tokens[False]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""
