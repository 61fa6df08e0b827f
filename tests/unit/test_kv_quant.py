"""The int8/fp8 KV cache: quantization rules (reference path, CPU), greedy agreement with a float
cache on a trained tiny model, bytes per token, the --kv-cache-dtype flag, copy-on-write and the KV
transfer moving quantized blocks with their scales."""

from __future__ import annotations

import argparse
import random
import threading
import uuid
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer

from helpers.engine_testing import greedy, load_tiny, one_torch_thread
from helpers.paged_generation import allocate_tables
from pdserve.cli.flags import KV_CACHE_DTYPES, add_engine_flags, engine_args_from
from pdserve.engine.model_runner import ModelRunner, ScheduledChunk, kv_cache_bytes_per_block
from pdserve.engine.setup import EngineArgs, build_engine
from pdserve.kernels import kv_quant, reference
from pdserve.kernels.kv_cache_alloc import allocate_cache, cache_block_bytes
from pdserve.kernels.kv_quant import FP8_MAX, INT8_MAX, dequantize_blocks, kv_cache_torch_dtype
from pdserve.kvtransfer import KVLayout, TCPKVReceiver, TCPKVSender
from pdserve.kvtransfer.nixl_agent import NixlAgent
from pdserve.kvtransfer.nixl_data import NixlReceiveSide, NixlSendSide
from pdserve.models.config import ModelConfig
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tiny_model_train import training_tokens

QUANTIZED = [torch.int8, torch.float8_e4m3fn]
TRAINED_STEPS = 600  # ~20 s on one busy core; 300-400 steps leave 1-3 near-tied continuations


@dataclass
class TrainedTiny:
    """The tiny Llama trained TRAINED_STEPS steps (loaded in float32), and the text [N] it learned."""

    model: torch.nn.Module
    config: ModelConfig
    text: torch.Tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with one_torch_thread():
        yield load_tiny(tmp_path_factory.mktemp("tiny_llama_kvq"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("trained_llama_kvq"), train_steps=TRAINED_STEPS)
    model, config = load_model(path, dtype=torch.float32)
    text = training_tokens(BackendTokenizer.from_file(str(path / "tokenizer.json")))
    return TrainedTiny(model, config, text)


def write(cache, x, slots):
    reference.write_kv_to_cache(x, x, cache.data, cache.data.clone(), torch.tensor(slots),
                                cache.scales, cache.scales.clone())


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_quantization_error_is_within_half_a_step(dtype):
    cache = allocate_cache(2, 8, 2, 32, dtype, "cpu")
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(0)) * 3
    write(cache, x, list(range(8, 16)))
    scale = cache.scales[1]  # [KVH]
    torch.testing.assert_close(scale, x.abs().amax(dim=(0, 2)) / (INT8_MAX if dtype == torch.int8 else FP8_MAX))
    got = dequantize_blocks(cache.data[1], scale)
    if dtype == torch.int8:  # uniform steps of `scale`
        assert ((got - x).abs() <= scale[None, :, None] / 2 * (1 + 1e-5)).all()
    else:  # 3 mantissa bits: relative error <= 2**-4 (above the subnormal range)
        normal = (x / scale[None, :, None]).abs() >= 2**-6
        assert ((got - x).abs()[normal] <= x.abs()[normal] * 2**-4 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_a_growing_block_scale_requantizes_what_the_block_holds(dtype):
    cache = allocate_cache(1, 4, 1, 16, dtype, "cpu")
    gen = torch.Generator().manual_seed(1)
    small, large = torch.randn(2, 1, 16, generator=gen), torch.randn(1, 1, 16, generator=gen) * 10
    write(cache, small, [0, 1])
    write(cache, large, [2])
    new_scale = float(large.abs().max()) / (INT8_MAX if dtype == torch.int8 else FP8_MAX)
    assert float(cache.scales[0, 0]) == pytest.approx(new_scale)
    got = dequantize_blocks(cache.data[0], cache.scales[0])
    # the earlier tokens, rounded twice, stay within one step of the new scale (int8) or within
    # two roundings of 3 mantissa bits (fp8)
    tol = new_scale if dtype == torch.int8 else float(small.abs().max()) * 2**-3 + new_scale * 2**-9
    assert (got[:2] - small).abs().max() <= tol
    assert float(got[3].abs().max()) == 0.0  # not written


def greedy_run(runner, prompts, tables, max_new, forced=None):
    """Greedy continuations (or, with `forced`, the argmax at each step while feeding forced's
    tokens: teacher forcing) and the logits of every step, [max_new, vocab] per prompt."""
    chunks = [ScheduledChunk(i, list(p), 0, tables[i], True) for i, p in enumerate(prompts)]
    steps = [runner.execute(chunks)]
    tokens = [[int(row.argmax())] for row in steps[0]]
    for step in range(max_new - 1):
        feed = [forced[i][step] if forced else tokens[i][-1] for i in range(len(prompts))]
        chunks = [ScheduledChunk(i, [feed[i]], len(p) + step, tables[i], True) for i, p in enumerate(prompts)]
        steps.append(runner.execute(chunks))
        for i, row in enumerate(steps[-1]):
            tokens[i].append(int(row.argmax()))
    return tokens, torch.stack(steps, dim=1)


def text_prompts(text: torch.Tensor, count: int, max_new: int) -> list[list[int]]:
    """count prompts of 16..51 tokens cut at seeded places from text [N] (the trained model's
    text), each followed by at least max_new tokens of that text."""
    rng = random.Random(0)
    prompts = []
    for _ in range(count):
        length = rng.randrange(16, 52)
        start = rng.randrange(0, text.numel() - length - max_new)
        prompts.append(text[start:start + length].tolist())
    return prompts


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_quantized_kv_greedy_equals_float_kv_on_a_trained_model(trained, dtype, capsys):
    """Issue 5's criterion: >= 95% of 32 greedy 64-token continuations identical to a float
    cache's, on the make-tiny-model checkpoint trained TRAINED_STEPS steps (peaked
    distributions like a real model's; on random weights the top two logits are nearly tied
    everywhere and 3/32 continuations stay identical even though int8 picks the float token
    97% of the time). Also printed and checked: teacher-forced next-token agreement on the
    float continuations, and how far the quantized cache moves the logits."""
    prompts = text_prompts(trained.text, 32, 64)
    tables, num_blocks = allocate_tables([len(p) for p in prompts], 64, 16)
    model, config = trained.model, trained.config
    with one_torch_thread():
        ref_tokens, ref_logits = greedy_run(ModelRunner(model, config, num_blocks, 16), prompts, tables, 64)
        q_tokens, _ = greedy_run(ModelRunner(model, config, num_blocks, 16, dtype), prompts, tables, 64)
        forced, forced_logits = greedy_run(ModelRunner(model, config, num_blocks, 16, dtype), prompts, tables,
                                           64, forced=ref_tokens)
    identical = sum(a == b for a, b in zip(ref_tokens, q_tokens))
    teacher_forced = sum(x == y for a, b in zip(ref_tokens, forced) for x, y in zip(a, b)) / (32 * 64)
    shift = (forced_logits - ref_logits).abs().amax(dim=-1)  # [32, 64]: largest logit change per step
    top2 = ref_logits.topk(2, dim=-1).values
    with capsys.disabled():
        print(f"\n{dtype} KV vs float KV (tiny Llama trained {TRAINED_STEPS} steps): {identical}/32 identical "
              f"64-token continuations, teacher-forced agreement {teacher_forced:.1%}; logit shift median "
              f"{float(shift.median()):.3f} max {float(shift.max()):.3f}; float top-2 gap median "
              f"{float((top2[..., 0] - top2[..., 1]).median()):.2f}")
    assert identical >= 0.95 * 32
    assert teacher_forced >= 0.99


def test_kv_bytes_per_token_drop_by_the_element_size_ratio(tiny):
    config, block_size = tiny.config, 16
    data = block_size * config.num_kv_heads * config.head_dim  # values per block, per layer, K or V
    runners = {dtype: ModelRunner(tiny.model, config, 8, block_size, dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn)}
    per_token = {dtype: r.kv_cache_bytes() / (8 * block_size) for dtype, r in runners.items()}
    for dtype, runner in runners.items():
        assert runner.kv_cache_bytes() == 8 * kv_cache_bytes_per_block(config, block_size, dtype)
    # int8/fp8: 1 byte per value plus 4 bytes of scale per KV head and block, padded to 16
    expected = 4 * data / cache_block_bytes(block_size, config.num_kv_heads, config.head_dim, torch.int8)
    assert per_token[torch.float32] / per_token[torch.int8] == pytest.approx(expected)
    assert per_token[torch.int8] == per_token[torch.float8_e4m3fn]
    assert per_token[torch.float32] / per_token[torch.int8] > 3.9
    assert per_token[torch.bfloat16] / per_token[torch.int8] > 1.95
    # a 1B-class Llama (16 layers, 8 KV heads of 64): bf16 -> int8 halves the cache to 0.4%
    llama_1b = ModelConfig("LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, 64, 131072, 1e-5, 5e5)
    ratio = kv_cache_bytes_per_block(llama_1b, 16, torch.bfloat16) / kv_cache_bytes_per_block(llama_1b, 16, torch.int8)
    assert ratio == pytest.approx(2 * 8192 / (8192 + 32))


def test_copy_on_write_copies_the_scales_with_the_block(tiny):
    runner = ModelRunner(tiny.model, tiny.config, 4, 16, torch.int8)
    runner.execute([ScheduledChunk(0, list(range(3, 23)), 0, [2, 0], True)])
    runner.copy_blocks([(0, 3)])
    for (k, v), (k_data, _), (k_scale, _) in zip(runner.kv_caches, runner.kv_data, runner.kv_scales):
        assert torch.equal(k[3], k[0]) and torch.equal(v[3], v[0])
        assert torch.equal(k_data[3], k_data[0]) and torch.equal(k_scale[3], k_scale[0])
        assert float(k_scale[3].min()) > 0


def test_kv_cache_dtype_flag_and_engine(tmp_path):
    model_dir = tmp_path / "m"
    make_tiny_model(model_dir, arch="llama", seed=0, size="tiny")
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    ns = parser.parse_args(["--model", str(model_dir), "--kv-cache-dtype", "int8", "--kv-cache-mb", "1"])
    args = engine_args_from(ns)
    assert args.kv_cache_dtype == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(model_dir), "--kv-cache-dtype", "int4"])
    with pytest.raises(ValueError, match="kv-cache-dtype 'int4'"):
        engine_args_from(argparse.Namespace(**{**vars(ns), "kv_cache_dtype": "int4"}))
    with pytest.raises(ValueError, match="auto, int8, fp8"):
        kv_cache_torch_dtype("e5m2", torch.float32)
    assert KV_CACHE_DTYPES == kv_quant.KV_CACHE_DTYPES  # the flag's choices (kept torch-free) are the kernel's
    with one_torch_thread():
        engine, _ = build_engine(args)
        float_engine, _ = build_engine(EngineArgs(model=str(model_dir), kv_cache_mb=1))
        out = engine.generate([list(range(3, 40))], greedy(8))[0]
    assert engine.runner.kv_dtype == torch.int8 and engine.runner.kv_scales is not None
    # the same memory holds ~4x the blocks (float32 model)
    assert engine.runner.num_blocks / float_engine.runner.num_blocks > 3.9
    assert len(out.samples[0].token_ids) == 8


@pytest.mark.parametrize("data_path", ["tcp", "nixl"])
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_quantized_blocks_move_with_their_scales(tiny, dtype, data_path):
    """Prefill on one runner, each layer's blocks moved to another over TCP frames or NIXL READs;
    the receiver's next-token logits equal the sender's (values and scales arrived as they were)."""
    with one_torch_thread():
        prefill = ModelRunner(tiny.model, tiny.config, 16, 4, dtype)
        decode = ModelRunner(tiny.model, tiny.config, 16, 4, dtype)
        layout = KVLayout.from_kv_caches(prefill.kv_caches)
        assert layout.dtype == str(dtype).removeprefix("torch.")
        send_side = recv_side = None
        if data_path == "nixl":
            send_side = NixlSendSide(NixlAgent(f"quant-send-{uuid.uuid4().hex[:8]}"), prefill.kv_caches)
            recv_side = NixlReceiveSide(NixlAgent(f"quant-recv-{uuid.uuid4().hex[:8]}"), layout, decode.kv_caches)
        rx = TCPKVReceiver(decode.kv_caches, nixl=recv_side, require_nixl=recv_side is not None)
        rx.start()
        try:
            prompt, src_ids, dst_ids = list(range(3, 25)), [9, 3, 5, 0, 14, 2], [1, 2, 3, 4, 12, 13]
            done, reported = {}, threading.Event()
            rx.expect("req", dst_ids, len(prompt), lambda rid, err: (done.setdefault(rid, err), reported.set()))
            transfer = TCPKVSender(layout, nixl=send_side, require_nixl=send_side is not None).open(
                rx.endpoint, "req", len(prompt))
            logits = prefill.execute([ScheduledChunk(0, prompt, 0, src_ids, True)],
                                     layer_done=lambda i: transfer.send_layer(i, *prefill.kv_caches[i], src_ids))
            assert transfer.finish(timeout=30).data_path == data_path
            assert reported.wait(10)  # over NIXL the receiver reports once it has the sender's CONFIRM
        finally:
            rx.stop()
            if send_side is not None:
                send_side.close()
        assert done == {"req": None}
        token = int(logits.argmax(-1))
        mine = prefill.execute([ScheduledChunk(0, [token], len(prompt), src_ids, True)])
        theirs = decode.execute([ScheduledChunk(0, [token], len(prompt), dst_ids, True)])
    assert torch.equal(mine, theirs)
    assert float(decode.kv_scales[0][0][dst_ids[0]].min()) > 0
