"""Briefly train a tiny checkpoint's weights on the packaged corpus, so that its next-token
distributions are peaked like a real model's (random weights give nearly tied logits, so any
small perturbation, such as a quantized KV cache, flips the greedy token).

The model learns the first TRAIN_TEXT_TOKENS tokens of `models/data/corpus.txt` by heart (a
tiny model cannot learn the whole corpus in seconds): given a prompt of a dozen or more tokens
taken from that text, its greedy continuation follows the text with wide margins between the
top two logits.  The forward here is dense and causal over Hugging Face key names (the network
`models/llama.py` runs over a paged cache); AdamW on next-token loss over random WINDOW-token
windows.  Training runs single-threaded with a seeded batch order: the same arguments give the
same weights on the same machine and torch build.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as BackendTokenizer

from pdserve.models.config import ModelConfig
from pdserve.models.rope import rope_inv_freq
from pdserve.models.tiny_tokenizer_train import CORPUS_PATH
from pdserve.models.torch_threads import one_torch_thread

TRAIN_TEXT_TOKENS = 2048  # the start of the corpus the model learns
BATCH_SIZE = 4
WINDOW = 128  # tokens per training window: positions 0..127 are trained
PEAK_LR = 3e-3
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.01


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] normalised by its root mean square, times weight [hidden]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D] rotated by cos/sin [T, D] (Hugging Face's rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attention(w: dict[str, torch.Tensor], prefix: str, h: torch.Tensor, config: ModelConfig,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """h: [B, T, hidden] -> causal GQA self-attention output [B, T, hidden]."""
    batch, length, _ = h.shape

    def project(name: str, heads: int) -> torch.Tensor:
        y = F.linear(h, w[f"{prefix}.{name}.weight"], w.get(f"{prefix}.{name}.bias"))
        return y.view(batch, length, heads, config.head_dim).transpose(1, 2)

    q = _rotate(project("q_proj", config.num_heads), cos, sin)
    k = _rotate(project("k_proj", config.num_kv_heads), cos, sin)
    v = project("v_proj", config.num_kv_heads)
    group = config.num_heads // config.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(batch, length, -1), w[f"{prefix}.o_proj.weight"])


def forward_logits(w: dict[str, torch.Tensor], config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """Token ids [B, T] (positions 0..T-1) -> logits [B, T, vocab], from weights under HF names."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    freqs = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([freqs.cos()] * 2, dim=-1), torch.cat([freqs.sin()] * 2, dim=-1)
    eps = config.rms_norm_eps
    x = F.embedding(ids, w["model.embed_tokens.weight"])
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        x = x + _attention(w, f"{p}.self_attn", _rms_norm(x, w[f"{p}.input_layernorm.weight"], eps),
                           config, cos, sin)
        h = _rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        gated = F.silu(F.linear(h, w[f"{p}.mlp.gate_proj.weight"])) * F.linear(h, w[f"{p}.mlp.up_proj.weight"])
        x = x + F.linear(gated, w[f"{p}.mlp.down_proj.weight"])
    x = _rms_norm(x, w["model.norm.weight"], eps)
    return F.linear(x, w.get("lm_head.weight", w["model.embed_tokens.weight"]))


def training_tokens(tokenizer: BackendTokenizer) -> torch.Tensor:
    """The text the model trains on: the first TRAIN_TEXT_TOKENS token ids [N] (int64) of the
    corpus, encoded without special tokens."""
    ids = tokenizer.encode(CORPUS_PATH.read_text(encoding="utf-8"), add_special_tokens=False).ids
    return torch.tensor(ids[:TRAIN_TEXT_TOKENS], dtype=torch.int64)


def _copy_windows(windows: torch.Tensor, separator: list[int], gen: torch.Generator) -> torch.Tensor:
    """windows [B, W] rewritten as: the first half of each, the separator, then the same half again from a
    random offset in it (so the copy starts anywhere), wrapping to its start again until W tokens; [B, W]."""
    width = windows.shape[1]
    half = (width - len(separator)) // 2
    out = []
    for row in windows:
        passage = row[:half]
        start = int(torch.randint(0, half // 2, (1,), generator=gen))
        copy = torch.cat([passage, torch.tensor(separator, dtype=row.dtype), passage[start:], passage])
        out.append(copy[:width])
    return torch.stack(out)


def _learning_rate(step: int, steps: int) -> float:
    """Linear warmup to PEAK_LR, then cosine decay to a tenth of it."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_weights(weights: dict[str, torch.Tensor], config: ModelConfig, tokens: torch.Tensor,
                  steps: int, seed: int, copy_separator: list[int] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """AdamW on next-token loss for `steps` steps of BATCH_SIZE random WINDOW-token windows of
    tokens [N] (int64), drawn with `seed`; `weights` (HF names -> float32 tensors) are the start
    and are not modified. Returns (the trained weights under the same names, the last step's loss).
    copy_separator: also teach copying from the context, as real models do (prompt lookup's premise): half of
    each batch's windows are a passage, these separator ids, and the passage again (from a random start in it).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"train steps must be an int >= 0, got {steps!r}")
    if tokens.numel() <= WINDOW:
        raise ValueError(f"need more than {WINDOW} training tokens, got {tokens.numel()}")
    gen = torch.Generator().manual_seed(seed)
    params = {name: t.detach().clone().requires_grad_(True) for name, t in weights.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    offsets = torch.arange(WINDOW + 1)
    loss = float("nan")
    with one_torch_thread():
        for step in range(steps):
            # windows wrap around the end, so that every token is trained on equally often
            starts = torch.randint(0, tokens.numel(), (BATCH_SIZE,), generator=gen)
            batch = tokens[(starts[:, None] + offsets) % tokens.numel()]  # [B, WINDOW + 1]
            if copy_separator is not None:
                batch[BATCH_SIZE // 2:] = _copy_windows(batch[BATCH_SIZE // 2:], copy_separator, gen)
            logits = forward_logits(params, config, batch[:, :-1])
            step_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            loss = float(step_loss.detach())
    return {name: p.detach().contiguous() for name, p in params.items()}, loss
