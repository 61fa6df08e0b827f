"""Counter-based random noise for seeded sampling: a pure function of (seed, sample, position, token).

Every random number the sampler uses is a hash of the row's key and the token id, so a row's
draw never depends on a generator's running state, on the other rows in the batch, or on the
order rows are processed: the same request gives the same tokens in any batch and when it is
resumed on another server.

The hash is SplitMix64 (Steele, Lea & Flood 2014): the noise for token v of a row is the
(v + 1)-th output of a SplitMix64 generator whose state starts at the row key. The tensor
version runs on int64 tensors with two's-complement wrap-around, so it gives bit-identical
integers on every device; a Triton kernel can reproduce it exactly.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_MUL_1 = 0xBF58476D1CE4E5B9
_MIX_MUL_2 = 0x94D049BB133111EB
_UNIFORM_BITS = 23  # (m + 0.5) / 2**23 is exact in float32 and never 0 or 1


def _to_signed(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned integer x."""
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64(z: int) -> int:
    """SplitMix64's output function (a bijection of 64-bit integers)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _MIX_MUL_1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX_MUL_2) & MASK64
    return z ^ (z >> 31)


def splitmix64(state: int) -> int:
    """First output of a SplitMix64 generator whose state is `state` (a 64-bit hash of it)."""
    return mix64(state + GOLDEN_GAMMA)


def row_key(seed: int, sample_index: int, output_position: int) -> int:
    """The 64-bit key of one sampling step: mixes the request seed, which of its n samples,
    and the index of the output token being sampled. Returned as an unsigned int."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    if sample_index < 0 or output_position < 0:
        raise ValueError(
            f"sample_index and output_position must be >= 0, got {sample_index}, {output_position}"
        )
    key = splitmix64(seed)
    key = splitmix64(key ^ sample_index)
    return splitmix64(key ^ output_position)


def row_keys_tensor(keys: list[int], device: torch.device | str) -> torch.Tensor:
    """[R] int64 tensor holding the 64-bit keys (as their two's-complement int64 values)."""
    return torch.tensor([_to_signed(k) for k in keys], dtype=torch.int64, device=device)


def _shift_right_logical(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned right shift of int64 bit patterns (torch's >> is arithmetic on int64)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """mix64 element-wise on int64 tensors, relying on wrap-around multiplication."""
    z = z ^ _shift_right_logical(z, 30)
    z = z * _to_signed(_MIX_MUL_1)
    z = z ^ _shift_right_logical(z, 27)
    z = z * _to_signed(_MIX_MUL_2)
    return z ^ _shift_right_logical(z, 31)


def token_hashes(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] int64: the (v + 1)-th SplitMix64 output for each row key in `keys` ([R] int64)."""
    steps = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=keys.device)
    states = keys[:, None] + steps[None, :] * _to_signed(GOLDEN_GAMMA)
    return _mix64_tensor(states)


def gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32 standard Gumbel noise, -log(-log(u)), with u uniform in (0, 1) taken from
    the top 23 bits of each token hash. argmax(logits + noise) is then an exact draw from
    softmax(logits) (the Gumbel-max trick, equivalent to the exponential race argmax(p / q))."""
    bits = _shift_right_logical(token_hashes(keys, vocab_size), 64 - _UNIFORM_BITS)
    uniform = (bits.to(torch.float32) + 0.5) * (2.0 ** -_UNIFORM_BITS)
    return -torch.log(-torch.log(uniform))
