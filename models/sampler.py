"""The batched sampler: picks one token per row of a logits batch.

Pipeline (vLLM v1 conventions), all in float32:
1. logprobs = log_softmax(raw logits): the returned logprobs are these "raw" ones, taken
   before penalties, masks, temperature and filters.
2. logit_bias is added; then min_tokens: while output_position < min_tokens, the row's
   stop_token_ids and (unless ignore_eos) the EOS ids are set to -inf (not on rows under a
   structured-output constraint: the constraint decides where such an output may end).
3. Penalties (repetition over prompt + output, frequency and presence over the output); all
   penalty work is skipped when no row uses them. Then the constrained rows' token masks
   (pdserve.models.grammar): tokens their constraint does not allow are set to -inf.
4. Greedy rows (temperature < 1e-5, like vLLM's epsilon): argmax (first index on ties).
5. Other rows: divide by temperature, then min-p, top-k, top-p (see models/sampling_filters.py),
   then Gumbel-max with noise that is a pure hash of (seed, sample_index, output_position, token)
   (see models/sampling_noise.py): a row gets the same token in any batch, on any server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from pdserve.models.grammar import mask_disallowed
from pdserve.models.sampling_filters import apply_top_k_top_p_min_p
from pdserve.models.sampling_noise import gumbel_noise, row_key, row_keys_tensor
from pdserve.models.sampling_params import SamplingParams
from pdserve.models.sampling_penalties import apply_penalties, mask_tokens

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (as vLLM's _SAMPLING_EPS)


@dataclass
class SamplingRow:
    """One row of a batch to sample: the request's params and its token history."""

    params: SamplingParams
    seed: int  # resolved per request (never None here); 0 <= seed < 2**64
    sample_index: int  # which of the n samples (0..n-1)
    output_position: int  # index of the token being sampled in this sample's output (0 = first)
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens this sample generated so far

    @property
    def is_greedy(self) -> bool:
        """True when this row takes the argmax."""
        return self.params.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """True when any of the three penalties changes the logits."""
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@dataclass
class SamplerOutput:
    """Chosen tokens with raw logprobs; B rows, N = max requested logprobs in the batch."""

    token_ids: torch.Tensor  # [B] int64, chosen tokens
    logprobs: torch.Tensor  # [B] float32, logprob of the chosen token
    top_token_ids: torch.Tensor | None  # [B, N] int64, None when no row asks for N >= 1
    top_logprobs: torch.Tensor | None  # [B, N] float32, descending


class Sampler:
    """Samples one token per row from [B, V] logits; vectorized except for building inputs.

    eos_token_ids: the model's end-of-sequence ids, masked during min_tokens unless a row sets
    ignore_eos.
    """

    def __init__(self, eos_token_ids: Iterable[int] = frozenset()) -> None:
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 allowed: tuple[list[int], torch.Tensor] | None = None) -> SamplerOutput:
        """Pick a token for each row. logits: [B, V] float (any dtype; B = len(rows)); allowed: the
        constrained rows' indices and their token bitmask [len(indices), ceil(V / 32)] int32."""
        _check_inputs(logits, rows)
        raw = logits.float()
        logprobs = torch.log_softmax(raw, dim=-1)
        adjusted = self._penalized_and_masked(raw, rows, allowed)
        token_ids = self._choose_tokens(adjusted, rows)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        top_ids, top_values = _top_logprobs(logprobs, rows)
        return SamplerOutput(token_ids, chosen, top_ids, top_values)

    def blocked_token_ids(self, row: SamplingRow) -> list[int]:
        """Token ids the row may not produce now: its stop ids (and EOS unless ignore_eos)
        while output_position < min_tokens; nothing afterwards."""
        if row.output_position >= row.params.min_tokens:
            return []
        blocked = set(row.params.stop_token_ids)
        if not row.params.ignore_eos:
            blocked |= self.eos_token_ids
        return sorted(blocked)

    def _penalized_and_masked(self, raw: torch.Tensor, rows: Sequence[SamplingRow],
                              allowed: tuple[list[int], torch.Tensor] | None) -> torch.Tensor:
        """raw with logit biases, min_tokens masks, penalties and constraint masks applied; raw itself when
        nothing applies."""
        constrained = set(allowed[0]) if allowed is not None else set()
        pairs = [(i, t) for i, row in enumerate(rows) if i not in constrained for t in self.blocked_token_ids(row)]
        penalized = [i for i, row in enumerate(rows) if row.uses_penalties]
        biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
        if not pairs and not penalized and not biased and not constrained:
            return raw
        adjusted = raw.clone()  # raw may be the caller's tensor
        if biased:
            _add_logit_bias(adjusted, [(i, rows[i].params.logit_bias) for i in biased])
        mask_tokens(adjusted, pairs)
        if penalized:
            index = torch.tensor(penalized, dtype=torch.int64, device=raw.device)
            chosen = [rows[i] for i in penalized]
            adjusted[index] = apply_penalties(
                adjusted[index],
                [r.prompt_token_ids for r in chosen],
                [r.output_token_ids for r in chosen],
                _param_tensor(chosen, "repetition_penalty", raw.device),
                _param_tensor(chosen, "frequency_penalty", raw.device),
                _param_tensor(chosen, "presence_penalty", raw.device),
            )
        if allowed is not None:
            index = torch.tensor(allowed[0], dtype=torch.int64, device=raw.device)
            masked = adjusted[index]
            mask_disallowed(masked, allowed[1])
            adjusted[index] = masked
        return adjusted

    def _choose_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """[B] int64: argmax for greedy rows, a seeded random draw for the others."""
        random_rows = [i for i, row in enumerate(rows) if not row.is_greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        if len(random_rows) == len(rows):
            return _sample_random(logits, rows)
        token_ids = logits.argmax(dim=-1)
        index = torch.tensor(random_rows, dtype=torch.int64, device=logits.device)
        token_ids[index] = _sample_random(logits[index], [rows[i] for i in random_rows])
        return token_ids


def _sample_random(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """[R] int64 draws from [R, V] logits: temperature, filters, then Gumbel-max."""
    device = logits.device
    temperature = _param_tensor(rows, "temperature", device)
    scaled = logits / temperature[:, None]
    top_k = torch.tensor([r.params.top_k for r in rows], dtype=torch.int64, device=device)
    filtered = apply_top_k_top_p_min_p(
        scaled, top_k, _param_tensor(rows, "top_p", device), _param_tensor(rows, "min_p", device)
    )
    keys = [row_key(r.seed, r.sample_index, r.output_position) for r in rows]
    noise = gumbel_noise(row_keys_tensor(keys, device), logits.shape[1])
    return (filtered + noise).argmax(dim=-1)


def _top_logprobs(
    logprobs: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The top-N raw logprobs per row for N = max requested (capped at V), or (None, None)."""
    wanted = max((r.params.logprobs or 0 for r in rows), default=0)
    count = min(wanted, logprobs.shape[1])
    if count == 0:
        return None, None
    values, ids = logprobs.topk(count, dim=-1, sorted=True)
    return ids, values


def _add_logit_bias(logits: torch.Tensor, biases: list[tuple[int, tuple[tuple[int, float], ...]]]) -> None:
    """Add each row's (token id, bias) pairs to logits [B, V] in place (ids past V are ignored:
    the engine checks them against the model's vocabulary, which may be padded)."""
    entries = [(row, token, bias) for row, pairs in biases for token, bias in pairs if token < logits.shape[1]]
    if not entries:
        return
    rows, tokens, values = zip(*entries)
    device = logits.device
    logits.index_put_((torch.tensor(rows, dtype=torch.int64, device=device),
                       torch.tensor(tokens, dtype=torch.int64, device=device)),
                      torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


def _param_tensor(rows: Sequence[SamplingRow], name: str, device: torch.device) -> torch.Tensor:
    """[R] float32 tensor of one SamplingParams field."""
    return torch.tensor([getattr(r.params, name) for r in rows], dtype=torch.float32, device=device)


def _check_inputs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits have {logits.shape[0]} rows but {len(rows)} sampling rows given")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    for i, row in enumerate(rows):
        if not 0 <= row.seed < 1 << 64:
            raise ValueError(f"row {i}: seed must be in [0, 2^64), got {row.seed}")
        if row.sample_index < 0 or row.output_position < 0:
            raise ValueError(f"row {i}: sample_index and output_position must be >= 0")
