"""The native CPU kernels (kernels/cpu_native.py): each against a float64 computation of what it
computes, row results independent of the batch and the thread count, the library's build and its
refusals, and a bfloat16 engine on them against the PyTorch path on a trained checkpoint."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as BackendTokenizer

from helpers.engine_testing import one_torch_thread
from helpers.paged_generation import allocate_tables, greedy_paged
from pdserve.engine.model_runner import ModelRunner
from pdserve.kernels import cpu_native, ops, reference
from pdserve.kernels.cpu_native import NativeKernelError, build_library, native_kernels, pack_linear_weight
from pdserve.models.loader import load_model
from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tiny_model_train import training_tokens

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="the native CPU kernels do not run here")
BF16_ROUNDING = 2.0 ** -8  # bfloat16's unit roundoff: one rounding of a value moves it at most this, relatively


def bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def within_one_rounding(got: torch.Tensor, exact: torch.Tensor, slack: float | torch.Tensor = 0.0) -> bool:
    return bool(((got.double() - exact).abs() <= BF16_ROUNDING * exact.abs() + slack).all())


# --- linear -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("out_features", "in_features", "bias"),
                         [(1280, 768, False), (33, 30, True), (100, 64, True), (16, 2, False)])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 64])
def test_linear_is_within_one_rounding_of_exact(out_features, in_features, bias, rows):
    weight = bf16(out_features, in_features, seed=1)
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(2)) if bias else None
    x = bf16(rows, in_features, seed=rows)
    got = native_kernels().linear(x, pack_linear_weight(weight), out_features, b)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    accumulation = 2.0 ** -20 * F.linear(x.double().abs(), weight.double().abs())  # float32 sums, K <= 768
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    assert within_one_rounding(got, exact, accumulation)


def test_linear_rows_do_not_depend_on_the_batch_or_threads():
    weight = bf16(96, 64, seed=3)
    packed = pack_linear_weight(weight)
    x = bf16(70, 64, seed=4)
    alone = torch.cat([native_kernels().linear(x[i:i + 1], packed, 96, None) for i in range(70)])
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows in (2, 8, 13, 70):
                assert torch.equal(native_kernels().linear(x[:rows], packed, 96, None), alone[:rows]), (threads, rows)
    finally:
        torch.set_num_threads(previous)


def test_linear_takes_strided_and_batched_inputs():
    weight = bf16(64, 32, seed=5)
    packed = pack_linear_weight(weight)
    wide = bf16(6, 48, seed=6)
    x = wide[:, 8:40]  # rows strided by 48
    expected = native_kernels().linear(x.contiguous(), packed, 64, None)
    assert torch.equal(native_kernels().linear(x, packed, 64, None), expected)
    assert torch.equal(native_kernels().linear(x.contiguous().view(2, 3, 32), packed, 64, None), expected.view(2, 3, 64))


def test_an_odd_number_of_input_features_is_refused():
    with pytest.raises(ValueError, match="even number of input features"):
        pack_linear_weight(bf16(32, 7))


def test_linear_refuses_rows_it_would_misread():
    packed = pack_linear_weight(bf16(32, 16))
    for x in (torch.randn(2, 16), bf16(2, 18)):
        with pytest.raises(ValueError, match="bfloat16 CPU rows of 16"):
            native_kernels().linear(x, packed, 32, None)


# --- decode attention -----------------------------------------------------------------------------------

def exact_decode_attention(q, key_cache, value_cache, tables, lengths, scale):
    """float64 attention of q [R, H, D] over each row's first lengths[r] cached tokens -> [R, H, D]."""
    num_heads, block_size, num_kv_heads = q.shape[1], key_cache.shape[1], key_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for r, length in enumerate(lengths):
        keys = reference.gather_paged_kv(key_cache, tables[r], length).double()
        values = reference.gather_paged_kv(value_cache, tables[r], length).double()
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [L, H, D]
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
        probs = (torch.einsum("hd,lhd->hl", q[r].double(), keys) * scale).softmax(-1)
        out[r] = torch.einsum("hl,lhd->hd", probs, values)
    assert block_size > 0
    return out


def attention_case(head_dim, num_heads, num_kv_heads, lengths, block_size=16, seed=0):
    rng = random.Random(seed)
    blocks_per_row = [-(-length // block_size) for length in lengths]
    num_blocks = sum(blocks_per_row) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # rows' blocks scattered over the cache
    width = max(blocks_per_row)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for r, count in enumerate(blocks_per_row):
        tables[r, :count] = torch.tensor([ids.pop() for _ in range(count)], dtype=torch.int32)
    key_cache = bf16(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 1, scale=2.0)
    value_cache = bf16(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 2)
    q = bf16(len(lengths), num_heads, head_dim, seed=seed + 3)
    return q, key_cache, value_cache, tables


def native_attention(q, key_cache, value_cache, tables, lengths, scale, tokens=None):
    tokens = torch.arange(q.shape[0], dtype=torch.int32) if tokens is None else tokens
    out = torch.zeros_like(q)
    native_kernels().decode_attention(q, key_cache, value_cache, tokens, torch.tensor(lengths, dtype=torch.int32),
                                      tables, scale, out)
    return out


@pytest.mark.parametrize(("head_dim", "num_heads", "num_kv_heads"),
                         [(16, 6, 2), (32, 4, 4), (64, 12, 4), (128, 8, 1), (256, 2, 2)])
def test_decode_attention_is_within_one_rounding_of_exact(head_dim, num_heads, num_kv_heads):
    lengths = [1, 15, 16, 17, 200, 33]
    q, key_cache, value_cache, tables = attention_case(head_dim, num_heads, num_kv_heads, lengths)
    scale = head_dim ** -0.5
    got = native_attention(q, key_cache, value_cache, tables, lengths, scale)
    exact = exact_decode_attention(q, key_cache, value_cache, tables, lengths, scale)
    # float32 scores, softmax and sums over up to 200 tokens, then one rounding to bfloat16
    assert within_one_rounding(got, exact, slack=1e-5)


def test_decode_attention_reads_each_rows_query_token_and_leaves_the_others():
    lengths = [40, 7]
    q, key_cache, value_cache, tables = attention_case(64, 8, 2, lengths)
    packed = torch.zeros(5, 8, 64, dtype=torch.bfloat16)
    packed[1], packed[4] = q[0], q[1]  # decode rows at tokens 1 and 4 of a step, prefill tokens elsewhere
    out = torch.full_like(packed, 7.0)
    native_kernels().decode_attention(packed, key_cache, value_cache, torch.tensor([1, 4], dtype=torch.int32),
                                      torch.tensor(lengths, dtype=torch.int32), tables, 0.125, out)
    expected = native_attention(q, key_cache, value_cache, tables, lengths, 0.125)
    assert torch.equal(out[1], expected[0]) and torch.equal(out[4], expected[1])
    assert bool((out[[0, 2, 3]] == 7.0).all())


def test_decode_attention_rows_do_not_depend_on_the_batch_or_threads():
    lengths = [300, 1, 64, 129, 16, 77, 5, 250]
    q, key_cache, value_cache, tables = attention_case(64, 12, 4, lengths, seed=9)
    alone = torch.cat([native_attention(q[r:r + 1], key_cache, value_cache, tables[r:r + 1], [lengths[r]], 0.125)
                       for r in range(len(lengths))])
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(native_attention(q, key_cache, value_cache, tables, lengths, 0.125), alone), threads
    finally:
        torch.set_num_threads(previous)


def test_decode_attention_refuses_a_head_dim_it_does_not_handle():
    q, key_cache, value_cache, tables = attention_case(48, 2, 2, [4])
    with pytest.raises(ValueError, match="head dims"):
        native_attention(q, key_cache, value_cache, tables, [4], 0.1)


def test_ops_refuse_tables_shorter_than_the_context_and_rotary_positions_past_the_table():
    q, key_cache, value_cache, tables = attention_case(64, 4, 2, [20])
    with pytest.raises(ValueError, match="longer than its 2 blocks"):
        ops.paged_attention(q, key_cache, value_cache, tables, torch.tensor([40]), torch.tensor([0, 1]), 0.125,
                            [1], [40])
    cos_sin = torch.zeros(8, 64)
    qk = bf16(1, 6, 64)
    for position in (8, -1):
        with pytest.raises(IndexError, match="rotary table"):
            ops.apply_rotary(qk[:, :4], qk[:, 4:], torch.tensor([position]), cos_sin)


def test_softmax_keeps_a_nan_score_nan():
    """A NaN in the cache (a diverged model) must show in the output, not turn into a confident answer."""
    q, key_cache, value_cache, tables = attention_case(64, 4, 2, [20])
    key_cache[tables[0, 0], 3] = float("nan")
    out = native_attention(q, key_cache, value_cache, tables, [20], 0.125)
    assert bool(out.isnan().any())


def test_ops_refuse_a_block_or_slot_past_the_cache():
    q, key_cache, value_cache, tables = attention_case(64, 4, 2, [20])
    tables[0, 1] = key_cache.shape[0]  # one past the last block
    with pytest.raises(IndexError, match="past the cache"):
        ops.paged_attention(q, key_cache, value_cache, tables, torch.tensor([20]), torch.tensor([0, 1]), 0.125,
                            [1], [20])
    k = bf16(1, 2, 64)
    with pytest.raises(IndexError, match="past the cache"):
        ops.write_kv_to_cache(k, k, key_cache, value_cache, torch.tensor([key_cache.shape[0] * 16]))


# --- elementwise ----------------------------------------------------------------------------------------

def test_silu_and_mul_is_within_one_rounding_of_exact():
    gate_up = bf16(5, 2 * 96, seed=11, scale=4.0)
    gate, up = gate_up.double().chunk(2, dim=-1)
    exact = F.silu(gate) * up
    got = ops.silu_and_mul(gate_up)
    assert within_one_rounding(got, exact, slack=1e-30)
    assert within_one_rounding(ops.silu_and_mul(torch.cat([gate_up, gate_up], 1)[:, :192]), exact, slack=1e-30)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(with_residual):
    x, residual, weight = bf16(6, 128, seed=12), bf16(6, 128, seed=13), bf16(128, seed=14)
    expected = reference.rms_norm(x, weight, 1e-6, residual if with_residual else None)
    got = ops.rms_norm(x, weight, 1e-6, residual if with_residual else None)
    assert torch.equal(got[1], expected[1])  # the residual sum: one rounding, as the reference's
    # the reference rounds twice (normed, then weight * normed); the sum of squares' order may flip one of them
    assert within_one_rounding(got[0], expected[0].double(), slack=BF16_ROUNDING * expected[0].double().abs())


def test_rotary_matches_the_reference_and_rotates_in_place():
    cos_sin = torch.cat([torch.randn(50, 32).cos(), torch.randn(50, 32).sin()], 1).contiguous()
    qkv = bf16(7, (4 + 2 + 2) * 64, seed=15)
    q, k, _ = qkv.split([4 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.view(7, 4, 64), k.view(7, 2, 64)
    positions = torch.tensor([0, 3, 49, 7, 7, 1, 20])
    expected_q, expected_k = reference.apply_rotary(q.clone(), k.clone(), positions, cos_sin)
    got_q, got_k = ops.apply_rotary(q, k, positions, cos_sin)
    assert got_q.data_ptr() == q.data_ptr()  # rotated where it was
    for got, expected in ((got_q, expected_q), (got_k, expected_k)):
        assert within_one_rounding(got, expected.double(), slack=BF16_ROUNDING * expected.double().abs())


def test_write_kv_equals_the_reference():
    key_cache = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    kv = bf16(5, 2 * 2 * 32, seed=16)
    k, v = (t.view(5, 2, 32) for t in kv.split(64, dim=-1))
    slots = torch.tensor([3, -1, 63, 17, 40])
    reference.write_kv_to_cache(k, v, expected_k, expected_v, slots)
    ops.write_kv_to_cache(k, v, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


# --- the library ---------------------------------------------------------------------------------------

def test_the_library_is_built_once_per_source(tmp_path):
    first = build_library(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build_library(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_without_a_compiler_a_library_built_earlier_is_used_and_else_it_says_why(tmp_path, monkeypatch):
    built = build_library(tmp_path / "image")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert build_library(tmp_path / "image") == built  # e.g. compiled into an image that has no compiler
    with pytest.raises(NativeKernelError, match="no C[+][+] compiler"):
        build_library(tmp_path / "fresh")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(NativeKernelError, match="no-such-compiler"):
        build_library(tmp_path / "fresh")


def test_an_unwritable_cache_folder_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PDSERVE_HOME", str(blocker))  # native/ cannot be made under a file
    with pytest.raises(NativeKernelError, match="cannot build the library"):
        cpu_native.load_native_kernels()


def test_the_switch_turns_the_kernels_off_and_takes_only_auto_or_off(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "off")
    with pytest.raises(NativeKernelError, match="PDSERVE_CPU_NATIVE=off"):
        cpu_native.load_native_kernels()
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "fast")
    with pytest.raises(NativeKernelError, match="not 'auto' or 'off'"):
        cpu_native.load_native_kernels()


# --- the engine on them ---------------------------------------------------------------------------------

TRAINED_STEPS = 600


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("trained_native"), train_steps=TRAINED_STEPS)


def test_a_bfloat16_engine_on_the_native_kernels_decodes_like_the_pytorch_path(trained_dir, monkeypatch):
    """Both are bfloat16 and round differently, so they may part where two tokens are near-tied: on the
    trained checkpoint (peaked distributions) at least 30 of 32 64-token greedy continuations agree."""
    text = training_tokens(BackendTokenizer.from_file(str(trained_dir / "tokenizer.json")))
    rng = random.Random(0)
    starts = [rng.randrange(0, text.numel() - 64) for _ in range(32)]
    prompts = [text[s:s + rng.randrange(16, 52)].tolist() for s in starts]
    tables, num_blocks = allocate_tables([len(p) for p in prompts], 64, 16)
    with one_torch_thread():
        model, config = load_model(trained_dir, dtype=torch.bfloat16)
        _, native = greedy_paged(ModelRunner(model, config, num_blocks, 16, cpu_linear="native"), prompts, 64, tables)
        model, config = load_model(trained_dir, dtype=torch.bfloat16)
        monkeypatch.setattr(ops, "BACKEND", "reference")
        _, pytorch = greedy_paged(ModelRunner(model, config, num_blocks, 16, cpu_linear="none"), prompts, 64, tables)
    assert sum(a == b for a, b in zip(native, pytorch)) >= 30
