"""The KV cache layout both sides of a transfer must share, and checks of cache tensors against it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from pdserve.kvtransfer.errors import KVLayoutMismatch

# Element sizes of the dtypes a KV cache may use; bytes move as they are, so 8-bit formats work too.
DTYPE_SIZES = {
    "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.bfloat16' -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """Shape of a paged KV cache: `num_layers` pairs of K and V tensors, each
    [num_blocks, block_size, num_kv_heads, head_dim] of `dtype` (a name such as "bfloat16").
    The number of blocks is each side's own business and is not part of the layout."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    def __post_init__(self):
        for field in fields(self)[:4]:
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
                raise ValueError(f"KVLayout.{field.name} must be an int in [1, 2**20], got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(DTYPE_SIZES)}")

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of K (or of V) in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * DTYPE_SIZES[self.dtype]

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def check_compatible(self, remote: KVLayout, local_name: str = "local",
                         remote_name: str = "remote") -> None:
        """Raise KVLayoutMismatch naming every field where `remote` differs from this layout."""
        diffs = [f"{f.name}: {local_name} {getattr(self, f.name)!r} vs {remote_name} "
                 f"{getattr(remote, f.name)!r}"
                 for f in fields(self) if getattr(self, f.name) != getattr(remote, f.name)]
        if diffs:
            raise KVLayoutMismatch("KV cache layouts are incompatible: " + "; ".join(diffs))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the handshake."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> KVLayout:
        """Parse a handshake dict; raises ValueError naming a missing or bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"layout must be an object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"layout is missing fields {missing}")
        return cls(**{n: data[n] for n in names})

    @classmethod
    def from_kv_caches(cls, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> KVLayout:
        """The layout of a list of (K, V) cache tensors, each [num_blocks, block_size, heads, head_dim]."""
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        key = kv_caches[0][0]
        if key.dim() != 4:
            raise ValueError(f"a KV cache tensor must be 4-D [blocks, block_size, heads, head_dim], "
                             f"got shape {tuple(key.shape)}")
        _, block_size, heads, head_dim = key.shape
        return cls(len(kv_caches), heads, head_dim, block_size, dtype_name(key.dtype))

    def check_cache_tensor(self, tensor: torch.Tensor, what: str) -> None:
        """Raise ValueError unless `tensor` is a contiguous [N, block_size, heads, head_dim] of dtype."""
        if dtype_name(tensor.dtype) != self.dtype:
            raise ValueError(f"{what} has dtype {dtype_name(tensor.dtype)}, the layout says {self.dtype}")
        expected = (self.block_size, self.num_kv_heads, self.head_dim)
        if tensor.dim() != 4 or tuple(tensor.shape[1:]) != expected:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}, the layout needs "
                             f"[num_blocks, {', '.join(map(str, expected))}]")
        if not tensor.is_contiguous():
            raise ValueError(f"{what} must be contiguous")

    def check_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Check every (K, V) pair against the layout; returns the number of blocks (same for all)."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"{len(kv_caches)} cache layers, the layout has {self.num_layers}")
        num_blocks = kv_caches[0][0].shape[0]
        for i, (key, value) in enumerate(kv_caches):
            for name, tensor in (("K", key), ("V", value)):
                self.check_cache_tensor(tensor, f"layer {i} {name} cache")
                if tensor.shape[0] != num_blocks:
                    raise ValueError(f"layer {i} {name} cache has {tensor.shape[0]} blocks, "
                                     f"layer 0 has {num_blocks}")
        return num_blocks
