"""GGUF files for tests, written from the Hugging Face checkpoints the tests make, laid out as llama.cpp writes them.

`write_gguf(hf_dir, out_path, tensor_type)` turns a Llama (or Mistral, which llama.cpp also converts as "llama") or
Qwen2 checkpoint into one GGUF file: the metadata keys, tensor names, q/k row permutation and tokenizer metadata of
llama.cpp's `convert_hf_to_gguf.py`, and for the quantized types the per-tensor choices of `llama-quantize --pure`:

- F32, F16, BF16, Q8_0: what the converter writes with `--outtype f32|f16|bf16|q8_0`.  A Q8_0 tensor whose rows are
  not a multiple of 32 falls back to F16, as the converter does.
- Q4_0, Q4_1, Q4_K, Q5_K, Q6_K: what `llama-quantize --pure <type>` makes of an F32 file.  Every 2-D weight gets the
  type (the token embedding and output too: no Q4_K_M-style mixture).  A K-type tensor whose rows are not a multiple
  of 256 falls back as llama.cpp's quantizer does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 where the row
  is not a multiple of 32 either.  llama.cpp has no fallback for Q4_0/Q4_1 (it aborts); so does this, with
  ValueError.  `general.file_type` says Q4_K_M / Q5_K_M / Q6_K for the K types.
- 1-D tensors (norms, biases, llama3 rope factors) stay F32 in every file.

Q8_0, Q4_0 and Q4_1 come from `gguf.quants`, whose numpy code is ggml's reference quantizer (llama-quantize gives the
same bytes).  gguf.quants has no Q4_K/Q5_K/Q6_K quantizer; this module's follow the search ggml's reference ones do
(a weighted least-squares fit over a few candidate scales per sub-block, then 6- or 8-bit sub-block scales under an
f16 super-block scale), written to the block layouts `gguf.quants.dequantize` reads.  They are not bit-identical to
ggml's output; their error is within 1% of it.  The same inputs always give the same bytes.

hf_dir must hold config.json, model*.safetensors and tokenizer.json (tokenizer_config.json, chat_template.jinja and
generation ids in config.json are read when present).

`make_sentencepiece_checkpoint` writes a tiny model whose tokenizer is a SentencePiece-style BPE, for files with
`tokenizer="sentencepiece"` (a llama.cpp "llama" vocabulary: scores and token types, no merges).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType, TokenType
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pdserve.models.tiny_model import make_tiny_model
from pdserve.models.tiny_tokenizer_train import CHAT_TEMPLATE, CORPUS_PATH

GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# config.json `architectures[0]` -> llama.cpp architecture (the converter's LlamaModel also takes Mistral).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
}

# llama-quantize's fallback for a K-type tensor whose row length is not a multiple of 256.
K_FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}

QK_K = 256

# Hugging Face per-layer name -> GGUF per-block name.
LAYER_TENSORS = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)

# Pre-tokenizer split patterns as tokenizer.json files spell them, under llama.cpp's `tokenizer.ggml.pre` names.
PRE_TOKENIZER_SPLITS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}

SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPM_SPACE = "\u2581"


# ---------------------------------------------------------------------------------------------------------------------
# Row permutation of q/k


def llama_rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of an HF q_proj/k_proj weight (or bias) the way llama.cpp's converter does for "llama".

    HF rotates the two halves of each head (row i pairs with row i + head_dim/2); GGML's "llama" rope rotates
    adjacent rows.  Within each head, GGUF row 2i is HF row i and GGUF row 2i+1 is HF row i + head_dim/2.  Pass
    num_attention_heads for q and num_key_value_heads for k.
    """
    rows = weight.shape[0]
    halves = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def llama_rope_unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo `llama_rope_permute`: GGUF "llama" q/k rows back to the HF order."""
    rows = weight.shape[0]
    pairs = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------------------------------
# K-quants


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (n, k) arrays, as float64."""
    return np.einsum("ij,ij->i", a, b).astype(np.float64)


def _fit_affine(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x, a scale and an offset m >= 0 with x ~ scale * q - m, q integer in [0, nmax].

    Tries nstep + 1 grid spacings around (max - min) / nmax and keeps the one whose weighted least-squares fit has
    the smallest weighted error; weights are rms(row) + |x|, so large values count more (as in ggml's Q4_K/Q5_K).
    """
    weights = (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + np.abs(x)).astype(np.float32)
    lo = np.minimum(x.min(axis=-1), 0.0).astype(np.float32)
    span = (x.max(axis=-1) - lo).astype(np.float32)
    flat = span <= 0
    span[flat] = 1.0
    shifted = x - lo[:, None]
    ones = np.ones_like(x)
    sum_w, sum_x, sum_x2 = _rowdot(weights, ones), _rowdot(weights, x), _rowdot(weights * x, x)
    weighted_x = weights * x

    def error(scale: np.ndarray, offset: np.ndarray, sum_q: np.ndarray, sum_q2: np.ndarray, sum_xq: np.ndarray):
        # sum w (scale q + offset - x)^2, expanded so that it needs only the row sums
        return (scale * scale * sum_q2 + offset * offset * sum_w + sum_x2 + 2 * scale * offset * sum_q
                - 2 * scale * sum_xq - 2 * offset * sum_x)

    def grid(inv: np.ndarray) -> tuple[np.ndarray, ...]:
        q = np.multiply(shifted, inv[:, None].astype(np.float32))
        np.rint(q, out=q)
        np.clip(q, 0, nmax, out=q)
        weighted_q = weights * q
        return _rowdot(weighted_q, ones), _rowdot(weighted_q, q), _rowdot(weighted_x, q)

    best_scale = span.astype(np.float64) / nmax
    best_offset = lo.astype(np.float64)
    best_err = error(best_scale, best_offset, *grid(1 / best_scale))
    for step in range(nstep + 1):
        sum_q, sum_q2, sum_xq = grid((rmin + rdelta * step + nmax) / span)
        det = sum_w * sum_q2 - sum_q * sum_q
        ok = det > 0
        det[~ok] = 1.0
        scale = (sum_w * sum_xq - sum_x * sum_q) / det
        offset = (sum_q2 * sum_x - sum_q * sum_xq) / det
        # The offset may only lower values (the block stores a non-negative min that is subtracted).
        clamp = offset > 0
        offset[clamp] = 0.0
        scale[clamp] = (sum_xq / np.where(sum_q2 > 0, sum_q2, 1.0))[clamp]
        err = error(scale, offset, sum_q, sum_q2, sum_xq)
        better = ok & (err < best_err)
        best_scale[better], best_offset[better], best_err[better] = scale[better], offset[better], err[better]
    best_scale[flat] = 0.0
    return best_scale.astype(np.float32), (-best_offset).astype(np.float32)


def _quantize_min_scale_k(rows: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """The shared part of Q4_K and Q5_K: per 256-block f16 d/dmin, packed 6-bit scales and mins, and q (n, 8, 32)."""
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    n = x.shape[0]
    scales, mins = _fit_affine(x.reshape(-1, 32), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=-1), mins.max(axis=-1)
    inv_scale = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)

    # Requantize against the scales as stored (f16 super-scale times 6-bit sub-scale), as the decoder will see them.
    sub_d = d.astype(np.float32)[:, None] * ls
    sub_m = dmin.astype(np.float32)[:, None] * lm
    safe = np.where(sub_d > 0, sub_d, 1.0)
    q = np.where(sub_d[..., None] > 0, np.clip(np.rint((x + sub_m[..., None]) / safe[..., None]), 0, nmax), 0)

    # 12 bytes: low 6 bits of scales 0-3 and mins 0-3, their top 2 bits carrying the high bits of 4-7.
    packed = np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)
    return d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, q.astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) 4-bit values -> (n, 128) bytes: sub-block 2c in the low and 2c+1 in the high nibbles of 32c..32c+31."""
    pairs = q.reshape(q.shape[0], 4, 2, 32) & 0x0F
    return (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(q.shape[0], 128).astype(np.uint8)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """One 144-byte Q4_K block per 256-value row of `rows`: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes."""
    d, dmin, scales, q = _quantize_min_scale_k(rows, nmax=15, rmin=-1.0, nstep=20)
    return np.concatenate([d, dmin, scales, _pack_nibbles(q)], axis=-1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    """One 176-byte Q5_K block per 256-value row: f16 d, f16 dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes."""
    d, dmin, scales, q = _quantize_min_scale_k(rows, nmax=31, rmin=-0.5, nstep=15)
    # Bit j of high byte i is bit 4 of element i of sub-block j.
    high = ((q >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([d, dmin, scales, qh, _pack_nibbles(q)], axis=-1)


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row of x, a signed scale with x ~ scale * q, q integer in [-nmax, nmax - 1].

    The value of largest magnitude maps to -nmax; 19 spacings around that are tried and the one with the best
    x^2-weighted least-squares fit is kept (ggml's Q6_K search).
    """
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    live = np.abs(peak) > 1e-15
    peak = np.where(live, peak, 1.0).astype(np.float32)
    weights = x * x
    weighted_x = weights * x
    best_scale = np.zeros(x.shape[0])
    best_score = np.full(x.shape[0], -1.0)
    for step in range(-9, 10):
        q = np.multiply(x, (-(nmax + 0.1 * step) / peak)[:, None].astype(np.float32))
        np.rint(q, out=q)
        np.clip(q, -nmax, nmax - 1, out=q)
        sum_xq = _rowdot(weighted_x, q)
        sum_q2 = _rowdot(weights * q, q)
        ok = sum_q2 > 0
        sum_q2[~ok] = 1.0
        score = np.where(ok, sum_xq * sum_xq / sum_q2, -1.0)
        better = score > best_score
        best_scale[better], best_score[better] = (sum_xq / sum_q2)[better], score[better]
    best_scale[~live] = 0.0
    return best_scale.astype(np.float32)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """One 210-byte Q6_K block per 256-value row: 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, f16 d."""
    x = rows.reshape(-1, 16, 16).astype(np.float32)
    n = x.shape[0]
    scales = _fit_symmetric(x.reshape(-1, 16), nmax=32).reshape(n, 16)
    peak = np.take_along_axis(scales, np.abs(scales).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    live = np.abs(peak) > 1e-15
    inv = np.where(live, -128 / np.where(live, peak, 1.0), 0.0)
    sc = np.clip(np.rint(inv[:, None] * scales), -128, 127).astype(np.int8)
    d = np.where(live, 1 / np.where(live, inv, 1.0), 0.0).astype(np.float16)

    sub_d = d.astype(np.float32)[:, None] * sc
    safe = np.where(sub_d != 0, sub_d, 1.0)
    q = np.where(sub_d[..., None] != 0, np.clip(np.rint(x / safe[..., None]), -32, 31), 0) + 32
    q = q.reshape(n, QK_K).astype(np.uint8)

    # Each 128-half: low nibbles of elements e and 64+e share byte e; high 2-bit pairs of 32s+e share byte e.
    halves = q.reshape(n, 2, 2, 64)
    ql = ((halves[:, :, 0, :] & 0x0F) | ((halves[:, :, 1, :] & 0x0F) << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = np.bitwise_or.reduce(high, axis=2).reshape(n, 64)
    dead = ~live
    if dead.any():  # an all-zero block is all zero bytes, as ggml writes it
        ql[dead], qh[dead], sc[dead] = 0, 0, 0
    return np.concatenate(
        [ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=-1
    )


K_QUANTIZERS = {QType.Q4_K: quantize_q4_k, QType.Q5_K: quantize_q5_k, QType.Q6_K: quantize_q6_k}


def quantize(data: np.ndarray, qtype: QType) -> np.ndarray:
    """`data` (float32, last dim divisible by the block size) in GGML type `qtype`, as GGUFWriter.add_tensor takes it.

    F32/F16 come back as float arrays, the rest as uint8 of shape (*leading dims, bytes per row).  Q4_K/Q5_K/Q6_K use
    this module's quantizers, every other type gguf.quants'.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype not in K_QUANTIZERS:
        return gguf.quants.quantize(data, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block_size:
        raise ValueError(f"row length {data.shape[-1]} is not a multiple of {block_size} ({qtype.name})")
    flat = data.reshape(-1, block_size)
    # A couple of thousand blocks at a time keeps the search's temporaries in cache (about 1.6x faster).
    blocks = [K_QUANTIZERS[qtype](flat[start:start + 2048]) for start in range(0, len(flat), 2048)]
    return np.concatenate(blocks).reshape(*data.shape[:-1], data.shape[-1] // block_size * type_size)


def tensor_qtype(name: str, shape: tuple[int, ...], tensor_type: str) -> QType:
    """The GGML type a tensor gets in a file of `tensor_type`, with llama.cpp's F32 rule and fallbacks (module doc)."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return QType.F32
    qtype = QType[tensor_type]
    row = shape[-1]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if row % block_size == 0:
        return qtype
    if qtype == QType.Q8_0:
        return QType.F16
    if qtype in K_FALLBACK:
        fallback = K_FALLBACK[qtype]
        return fallback if row % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else QType.F16
    raise ValueError(f"{name}: row length {row} is not a multiple of {block_size}, and llama.cpp has no fallback "
                     f"for {tensor_type}")


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def _load_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint's model*.safetensors files, as float32 numpy arrays."""
    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {hf_dir}")
    weights = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            weights[name] = tensor.to(torch.float32).numpy()
    return weights


def _rope_parameters(config: dict) -> dict:
    """The rope settings of a config.json, whether it spells them the legacy way (rope_scaling) or as rope_parameters."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "rope_type" not in rope:
        rope["rope_type"] = rope.get("type", "default")
    return rope


def _llama3_rope_factors(config: dict, rope: dict, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp reads from `rope_freqs.weight` for llama3 rope scaling.

    llama.cpp's converter takes original_max_position_embeddings from the top level of the config (default 8192),
    where a transformers 5 config keeps it only inside the rope settings; this takes the rope settings' value, so
    the factors match what transformers computes for the checkpoint.
    """
    base = rope["rope_theta"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _gguf_tensors(config: dict, arch: str, weights: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of the file, in the order they are written."""
    weights = {name: w for name, w in weights.items() if not name.endswith("rotary_emb.inv_freq")}
    used = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return weights[name]

    n_head = config["num_attention_heads"]
    n_kv_head = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    out = []
    rope = _rope_parameters(config)
    if arch == "llama" and rope["rope_type"].lower() == "llama3":
        out.append(("rope_freqs.weight", _llama3_rope_factors(config, rope, head_dim)))
    out.append(("token_embd.weight", take("model.embed_tokens.weight")))
    for layer in range(config["num_hidden_layers"]):
        for hf_part, gguf_part in LAYER_TENSORS:
            for suffix in ("weight", "bias"):
                hf_name = f"model.layers.{layer}.{hf_part}.{suffix}"
                if hf_name not in weights:
                    if suffix == "weight":
                        raise KeyError(f"{hf_name} missing from the checkpoint")
                    continue
                tensor = take(hf_name)
                if arch == "llama" and gguf_part in ("attn_q", "attn_k"):
                    tensor = llama_rope_permute(tensor, n_head if gguf_part == "attn_q" else n_kv_head)
                out.append((f"blk.{layer}.{gguf_part}.{suffix}", tensor))
    out.append(("output_norm.weight", take("model.norm.weight")))
    # A tied head has no tensor of its own: llama.cpp reuses token_embd when output.weight is absent.
    if config.get("tie_word_embeddings", False):
        used.add("lm_head.weight")
    else:
        out.append(("output.weight", take("lm_head.weight")))
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"checkpoint tensors with no GGUF name: {unused}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for the tokenizer's split regex: an exact match, else the closest one."""
    pattern = None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    for part in pre.get("pretokenizers", [pre]):
        if part.get("type") == "Split" and "Regex" in part.get("pattern", {}):
            pattern = part["pattern"]["Regex"]
        elif part.get("type") == "ByteLevel" and part.get("use_regex", True) and pattern is None:
            pattern = PRE_TOKENIZER_SPLITS["gpt-2"]
    if pattern is None:
        return "default"
    for name, split in PRE_TOKENIZER_SPLITS.items():
        if split == pattern:
            return name

    def similarity(name: str) -> float:
        return difflib.SequenceMatcher(None, pattern, PRE_TOKENIZER_SPLITS[name]).ratio()

    return max(PRE_TOKENIZER_SPLITS, key=similarity)


def _looks_special(token: str) -> bool:
    """The converter's guess that an added token not marked special is a control token anyway (<|...|> and the like)."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _special_vocab(hf_dir: Path, tokenizer_json: dict, config: dict) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and the add_{bos,eos}_token flags of the checkpoint's tokenizer.

    Ids are found where llama.cpp's gguf.SpecialVocab looks: the tokenizer_config.json token strings among
    tokenizer.json's added tokens, then config.json's `<type>_token_id`.  The flags say what the tokenizer.json
    post-processor does (a TemplateProcessing that starts with BOS / ends with EOS); tokenizer_config.json's
    add_bos_token / add_eos_token are ignored, as transformers v5 ignores them for a tokenizer.json.  (llama.cpp's
    converter would let those win; the two agree for the checkpoints the tests make.)
    """
    config_file = hf_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    added = {token["content"]: token["id"] for token in tokenizer_json.get("added_tokens", [])}
    ids = {}
    for typ in SPECIAL_TOKEN_TYPES:
        entry = tokenizer_config.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in added:
            ids[typ] = added[content]
        elif isinstance(config.get(f"{typ}_token_id"), int):
            ids[typ] = config[f"{typ}_token_id"]

    id_to_content = {token_id: content for content, token_id in added.items()}
    flags = {"bos": False, "eos": False}
    post = tokenizer_json.get("post_processor") or {}
    for processor in post.get("processors", [post]):
        single = processor.get("single") if processor.get("type") == "TemplateProcessing" else None
        if single:
            first = single[0].get("SpecialToken", {}).get("id")
            last = single[-1].get("SpecialToken", {}).get("id")
            flags["bos"] = first is not None and first == id_to_content.get(ids.get("bos"))
            flags["eos"] = last is not None and last == id_to_content.get(ids.get("eos"))
    return ids, flags


def _chat_template(hf_dir: Path, chat_template: str | None) -> str | None:
    """The argument if given, else tokenizer_config.json's template, else chat_template.jinja's, else None."""
    if chat_template is not None:
        return chat_template
    config_file = hf_dir / "tokenizer_config.json"
    if config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    jinja = hf_dir / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json BPE merges as pairs, from either the "a b" or the ["a", "b"] spelling."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _is_sentencepiece_style(tokenizer_json: dict) -> bool:
    """Whether tokenizer.json is a SentencePiece-style BPE (byte fallback, no byte-level pre-tokenizer)."""
    return tokenizer_json["model"].get("type") == "BPE" and bool(tokenizer_json["model"].get("byte_fallback"))


def _vocab_entries(tokenizer_json: dict, n_vocab: int) -> tuple[list[str | None], dict[int, dict]]:
    """Token strings by id (None for holes) and the added-token records by id."""
    tokens: list[str | None] = [None] * n_vocab
    for token, token_id in tokenizer_json["model"]["vocab"].items():
        if token_id >= n_vocab:
            raise ValueError(f"token {token!r} has id {token_id} >= vocab_size {n_vocab}")
        tokens[token_id] = token
    added = {}
    for record in tokenizer_json.get("added_tokens", []):
        if record["id"] >= n_vocab:
            raise ValueError(f"added token {record['content']!r} has id {record['id']} >= vocab_size {n_vocab}")
        tokens[record["id"]] = record["content"]
        added[record["id"]] = record
    return tokens, added


def _add_bpe_vocab(writer: gguf.GGUFWriter, tokenizer_json: dict, n_vocab: int) -> None:
    """tokenizer.ggml.{model,pre,tokens,token_type,merges} for a byte-level BPE, as the converter writes them."""
    if _is_sentencepiece_style(tokenizer_json):
        raise ValueError("tokenizer.json is a SentencePiece-style BPE (byte fallback): use tokenizer='sentencepiece'")
    tokens, added = _vocab_entries(tokenizer_json, n_vocab)
    types = []
    for token_id, token in enumerate(tokens):
        if token is None:
            tokens[token_id] = f"[PAD{token_id}]"
            types.append(TokenType.UNUSED)
        elif token_id in added:
            special = added[token_id].get("special") or _looks_special(token)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    # The converter writes merges as "a b"; a space inside a piece is written as U+0120 so the split stays unambiguous.
    merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in _merge_pairs(tokenizer_json["model"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def sentencepiece_scores(tokenizer_json: dict) -> dict[str, float]:
    """SentencePiece scores for the pieces of a SentencePiece-style BPE tokenizer.json, from its merge order.

    A piece made by a merge scores -k, k its rank among the merged pieces ordered by the first merge that makes them;
    the other normal pieces (single characters) follow at -(number of merged pieces + i) in id order.  Unknown,
    control and byte pieces are not included (they score 0).
    """
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    added = {record["content"] for record in tokenizer_json.get("added_tokens", [])}
    scores = {}
    for left, right in _merge_pairs(model):
        merged = left + right
        if merged in vocab and merged not in scores:
            scores[merged] = -float(len(scores))
    rest = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])
            if token not in scores and token not in added and token != model.get("unk_token")
            and not BYTE_TOKEN.fullmatch(token)]
    for token in rest:
        scores[token] = -float(len(scores))
    return scores


def _add_sentencepiece_vocab(writer: gguf.GGUFWriter, tokenizer_json: dict, n_vocab: int) -> None:
    """tokenizer.ggml.{model,pre,tokens,scores,token_type} as the converter writes them from a tokenizer.model."""
    if not _is_sentencepiece_style(tokenizer_json):
        raise ValueError("tokenizer.json is not a SentencePiece-style BPE (no byte fallback): use tokenizer='bpe'")
    tokens, added = _vocab_entries(tokenizer_json, n_vocab)
    piece_scores = sentencepiece_scores(tokenizer_json)
    unk = tokenizer_json["model"].get("unk_token")
    scores, types = [], []
    for token_id, token in enumerate(tokens):
        if token is None:
            tokens[token_id] = f"[PAD{token_id}]"
            scores.append(-10000.0)
            types.append(TokenType.UNUSED)
        elif token == unk:
            scores.append(0.0)
            types.append(TokenType.UNKNOWN)
        elif token_id in added and (added[token_id].get("special") or _looks_special(token)):
            scores.append(0.0)
            types.append(TokenType.CONTROL)
        elif token_id in added:
            # llama.cpp keeps user-defined pieces in their spoken form: spaces, not U+2581.
            tokens[token_id] = token.replace(SPM_SPACE, " ")
            scores.append(-1000.0)
            types.append(TokenType.USER_DEFINED)
        elif BYTE_TOKEN.fullmatch(token):
            scores.append(0.0)
            types.append(TokenType.BYTE)
        else:
            scores.append(piece_scores[token])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


# ---------------------------------------------------------------------------------------------------------------------
# The file


def _add_hyperparameters(writer: gguf.GGUFWriter, config: dict, arch: str, file_type: LlamaFileType) -> None:
    """The `{arch}.*` keys, in the converter's order (TextModel's, then LlamaModel's additions)."""
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    rope = _rope_parameters(config)
    rope_type = rope["rope_type"].lower()
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):  # llama3 is carried by the rope_freqs.weight tensor
        raise ValueError(f"rope type {rope_type!r} is not supported")
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    # A transformers config always has head_dim, so the converter (which reads it through AutoConfig) always writes these.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)


def write_gguf(hf_dir: Path, out_path: Path, tensor_type: str, *, tokenizer: str = "bpe",
               chat_template: str | None = None) -> Path:
    """Convert the Llama/Qwen2 HF checkpoint in hf_dir into one GGUF file, as llama.cpp's converter lays it out.

    tensor_type: one of GGUF_TENSOR_TYPES (see the module doc for what each means, the F32 tensors and fallbacks).
    tokenizer: "bpe" for a byte-level BPE tokenizer.json ("gpt2" vocabulary with merges), "sentencepiece" for a
    SentencePiece-style one ("llama" vocabulary with scores, as from `make_sentencepiece_checkpoint`).
    chat_template: written as tokenizer.chat_template instead of the checkpoint's own.  Returns out_path.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if tensor_type not in GGUF_TENSOR_TYPES:
        raise ValueError(f"unknown tensor_type {tensor_type!r}; expected one of {GGUF_TENSOR_TYPES}")
    if tokenizer not in ("bpe", "sentencepiece"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'bpe' or 'sentencepiece'")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    hf_arch = (config.get("architectures") or [None])[0]
    if hf_arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {hf_arch!r}; expected one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[hf_arch]
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))

    writer = gguf.GGUFWriter(out_path, arch)
    for name, data in _gguf_tensors(config, arch, _load_weights(hf_dir)):
        qtype = tensor_qtype(name, data.shape, tensor_type)
        writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(hf_dir.name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    _add_hyperparameters(writer, config, arch, FILE_TYPES[tensor_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    n_vocab = config["vocab_size"]
    if tokenizer == "bpe":
        _add_bpe_vocab(writer, tokenizer_json, n_vocab)
    else:
        _add_sentencepiece_vocab(writer, tokenizer_json, n_vocab)
    ids, flags = _special_vocab(hf_dir, tokenizer_json, config)
    if tokenizer == "sentencepiece":
        ids.setdefault("unk", tokenizer_json["model"]["vocab"].get(tokenizer_json["model"].get("unk_token")))
    for typ in SPECIAL_TOKEN_TYPES:
        if ids.get(typ) is not None:
            getattr(writer, f"add_{typ}_token_id")(ids[typ])
    # Written even when False: llama.cpp adds BOS by default for "llama" and for some "gpt2" pre-tokenizers.
    writer.add_add_bos_token(flags["bos"])
    writer.add_add_eos_token(flags["eos"])
    template = _chat_template(hf_dir, chat_template)
    if template is not None:
        writer.add_chat_template(template)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# ---------------------------------------------------------------------------------------------------------------------
# A SentencePiece-style checkpoint


def _alphabet(lines: list[str], size: int) -> list[str]:
    """The `size` most frequent characters of `lines` (ties by code point), so rare ones fall back to bytes."""
    counts: dict[str, int] = {}
    for line in lines:
        for char in line.replace(" ", SPM_SPACE):
            counts[char] = counts.get(char, 0) + 1
    counts[SPM_SPACE] = counts.get(SPM_SPACE, 0) + len(lines)  # the prefix space of every line
    return sorted(counts, key=lambda char: (-counts[char], char))[:size]


def sentencepiece_tokenizer_json(vocab_size: int) -> str:
    """A SentencePiece-style BPE tokenizer.json with exactly vocab_size pieces, trained on models/data/corpus.txt.

    Ids 0, 1, 2 are <unk>, <s>, </s>; 3..258 the byte pieces <0x00>..<0xFF>; then the merged pieces in merge order,
    then the single characters kept (a third of the rest, most frequent first).  Like the tokenizer.json that
    transformers makes from a SentencePiece BPE model, the merges are every split of a piece into two pieces, ordered
    by the piece's score, so the file encodes as a SentencePiece "llama" vocabulary with those scores does.
    """
    specials = ["<unk>", "<s>", "</s>"]
    n_rest = vocab_size - len(specials) - 256
    if n_rest < 16:
        raise ValueError(f"vocab_size must be at least {len(specials) + 256 + 16}, got {vocab_size}")
    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    alphabet = _alphabet(lines, n_rest // 3)

    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + n_rest, min_frequency=2, special_tokens=specials, limit_alphabet=len(alphabet),
        initial_alphabet=alphabet, show_progress=False,
    )
    trainer_model.train_from_iterator(lines, trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    merged = []
    for left, right in _merge_pairs(trained):
        if left + right not in merged:
            merged.append(left + right)
    pieces = merged + [char for char in alphabet if char not in merged]
    if len(pieces) != n_rest or set(pieces) != set(trained["vocab"]) - set(specials):
        raise ValueError(f"the corpus gave {len(pieces)} pieces, {n_rest} were needed for vocab_size {vocab_size}")

    byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    vocab = {token: token_id for token_id, token in enumerate(specials + byte_pieces + pieces)}
    score = {piece: -float(rank) for rank, piece in enumerate(pieces)}
    splits = []
    for piece in pieces:
        for cut in range(len(piece) - 1, 0, -1):  # for one piece, longer left parts first
            if piece[:cut] in vocab and piece[cut:] in vocab:
                splits.append((piece[:cut], piece[cut:]))
    splits.sort(key=lambda pair: -score[pair[0] + pair[1]])  # stable: keeps the per-piece order

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=splits, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise ValueError(f"built {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, wanted {vocab_size}")
    return tokenizer.to_str(pretty=True)


def make_sentencepiece_checkpoint(out_dir: Path, arch: str, size: str, vocab_size: int) -> Path:
    """A tiny-model checkpoint in out_dir whose tokenizer is a SentencePiece-style BPE, for tokenizer="sentencepiece".

    The weights and config come from `make_tiny_model(out_dir, arch=arch, size=size)` (its vocab_size must equal
    `vocab_size`: tiny 512, small 1024, base 2048); tokenizer.json, tokenizer_config.json and the bos/eos ids of
    config.json and generation_config.json are then replaced (<unk> 0, <s> 1, </s> 2, BOS added).  Returns out_dir.
    """
    out = Path(out_dir)
    make_tiny_model(out, arch=arch, size=size)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if config["vocab_size"] != vocab_size:
        raise ValueError(f"make_tiny_model(size={size!r}) has vocab_size {config['vocab_size']}, not {vocab_size}")
    (out / "tokenizer.json").write_text(sentencepiece_tokenizer_json(vocab_size), encoding="utf-8")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config.update(unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True,
                            add_eos_token=False, chat_template=CHAT_TEMPLATE)
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    config.update(ids)
    for name, data in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                       ("generation_config.json", ids)):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
