"""Top-k, top-p and min-p filtering of temperature-scaled logits, vectorized over the batch.

Semantics (vLLM v1 conventions; HF and vLLM v0 apply min-p last instead, which only matters
through top-p's renormalization):

1. min-p: drop token i when p_i < min_p * p_max, i.e. exp(x_i - x_max) < min_p.
   min_p = 0 is off.
2. top-k: keep the tokens whose logit is >= the k-th largest logit. Tokens tied with the k-th
   one are all kept, so more than k can survive (as in vLLM). k <= 0 or k >= V is off.
   min-p and top-k are both "keep logit >= threshold" rules, so their order does not matter.
3. top-p, on the distribution renormalized over the survivors of 1-2: walk the survivors in
   descending order and keep a token when the probability mass strictly before it is < top_p
   (the token that crosses top_p is kept, so at least one token always survives). Every token
   tied with the last kept one is kept too, which makes the result independent of how a sort
   orders ties. top_p = 1 is off.

Each rule therefore reduces to a per-row logit threshold; a token survives when its logit is
>= the largest of the row's thresholds. Dropped tokens are set to -inf.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Mask the tokens that top-k, top-p and min-p drop.

    logits: [R, V] float32, already divided by temperature (may hold -inf, each row needs at
    least one finite value). top_k: [R] int (<= 0 or >= V: off). top_p: [R] float in (0, 1]
    (1: off). min_p: [R] float in [0, 1] (0: off). Returns a new [R, V] tensor where dropped
    tokens are -inf (or `logits` itself when no row filters anything).
    """
    _check_filter_args(logits, top_k, top_p, min_p)
    vocab_size = logits.shape[1]
    k = top_k.to(device=logits.device, dtype=torch.int64)
    k = torch.where((k <= 0) | (k >= vocab_size), torch.full_like(k, vocab_size), k)
    p = top_p.to(device=logits.device, dtype=torch.float32)
    mp = min_p.to(device=logits.device, dtype=torch.float32)
    use_top_p = bool((p < 1.0).any())
    use_top_k = bool((k < vocab_size).any())
    if not (use_top_p or use_top_k or bool((mp > 0.0).any())):
        return logits

    threshold = _min_p_threshold(logits, mp)
    if use_top_p:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        threshold = torch.maximum(threshold, sorted_logits.gather(1, k[:, None] - 1))
        threshold = torch.maximum(threshold, _top_p_threshold(sorted_logits, threshold, p))
    elif use_top_k:
        threshold = torch.maximum(threshold, _top_k_threshold(logits, k))
    return logits.masked_fill(logits < threshold, _NEG_INF)


def _check_filter_args(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    rows = logits.shape[0]
    for name, values in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if values.shape != (rows,):
            raise ValueError(f"{name} must have shape [{rows}], got {tuple(values.shape)}")


def _min_p_threshold(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[R, 1]: x_max + log(min_p); -inf for rows with min_p = 0."""
    row_max = logits.max(dim=-1, keepdim=True).values
    return row_max + torch.log(min_p)[:, None]


def _top_k_threshold(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[R, 1]: the k-th largest logit per row (-inf where top-k is off), via one topk call."""
    vocab_size = logits.shape[1]
    active = k < vocab_size
    largest_k = int(k[active].max())
    top_values = logits.topk(largest_k, dim=-1, sorted=True).values
    kth = top_values.gather(1, (k.clamp(max=largest_k) - 1)[:, None])
    return torch.where(active[:, None], kth, torch.full_like(kth, _NEG_INF))


def _top_p_threshold(
    sorted_logits: torch.Tensor, threshold: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[R, 1]: the logit of the last token top-p keeps, given [R, V] descending logits and the
    [R, 1] thresholds of the earlier rules (tokens below them carry no probability)."""
    survivors = sorted_logits.masked_fill(sorted_logits < threshold, _NEG_INF)
    probs = survivors.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    # Mass strictly before each position; a shifted cumsum stays monotone in floating point.
    mass_before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)
    # clamp: a row with no finite logit has NaN mass; it must not index position -1.
    keep_count = (mass_before < top_p[:, None]).sum(dim=-1, keepdim=True).clamp_(min=1)
    kept_min = sorted_logits.gather(1, keep_count - 1)
    # top_p = 1 is off even when the float cumsum overshoots 1 before the last survivor.
    return torch.where(top_p[:, None] >= 1.0, torch.full_like(kept_min, _NEG_INF), kept_min)
