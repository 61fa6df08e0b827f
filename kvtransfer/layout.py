"""The KV cache layout both sides of a transfer must share, and checks of cache tensors against it."""

from __future__ import annotations

import functools
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


MAX_TENSOR_PARALLEL_SIZE = 128  # bounds what a peer's layout makes this side allocate (replicated heads)


def kv_heads_of_rank(num_kv_heads: int, rank: int, size: int) -> range:
    """The model's KV heads that tensor-parallel rank `rank` of `size` holds: num_kv_heads / size of
    them, or one replicated head when there are fewer KV heads than ranks."""
    if num_kv_heads >= size:
        per_rank = num_kv_heads // size
        return range(rank * per_rank, (rank + 1) * per_rank)
    head = rank // (size // num_kv_heads)
    return range(head, head + 1)


@dataclass(frozen=True)
class HeadSlice:
    """Part of a destination rank's cache rows and where it comes from: heads [dst_head, dst_head +
    count) of dst_rank's cache are heads [src_head, src_head + count) of src_rank's (rank-local head
    indices)."""

    dst_rank: int
    src_rank: int
    src_head: int
    dst_head: int
    count: int


@dataclass(frozen=True)
class KVLayout:
    """Shape of a server's paged KV cache: `num_layers` pairs of K and V tensors per tensor-parallel
    rank, each [num_blocks, block_size, heads_per_rank, head_dim] of `dtype` (a name such as
    "bfloat16"). num_kv_heads is the model's; rank r holds kv_heads_of_rank(num_kv_heads, r,
    tensor_parallel_size) of them. The number of blocks is each side's own business and is not part of
    the layout (every rank of a server has the same blocks)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    tensor_parallel_size: int = 1

    def __post_init__(self):
        for field in fields(self)[:4]:
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
                raise ValueError(f"KVLayout.{field.name} must be an int in [1, 2**20], got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(DTYPE_SIZES)}")
        tp, kv = self.tensor_parallel_size, self.num_kv_heads
        if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= MAX_TENSOR_PARALLEL_SIZE:
            raise ValueError(f"KVLayout.tensor_parallel_size must be an int in [1, {MAX_TENSOR_PARALLEL_SIZE}], "
                             f"got {tp!r}")
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ValueError(f"KVLayout: {kv} KV heads do not split over {tp} tensor-parallel ranks")

    @property
    def heads_per_rank(self) -> int:
        """KV heads in each rank's cache."""
        return max(1, self.num_kv_heads // self.tensor_parallel_size)

    def rank_heads(self, rank: int) -> range:
        """The model's KV heads rank `rank` holds."""
        return kv_heads_of_rank(self.num_kv_heads, rank, self.tensor_parallel_size)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of K (or of V) in one layer of one rank's cache."""
        return self.block_size * self.heads_per_rank * self.head_dim * DTYPE_SIZES[self.dtype]

    @property
    def server_block_bytes(self) -> int:
        """Bytes of one block of K (or of V) in one layer over all ranks (what a transfer into this
        layout moves per block, layer and half)."""
        return self.tensor_parallel_size * self.block_bytes

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def check_compatible(self, remote: KVLayout, local_name: str = "local",
                         remote_name: str = "remote") -> None:
        """Raise KVLayoutMismatch naming every field where `remote` differs from this layout, the
        tensor-parallel size excepted: the transfer maps heads between ranks (head_map)."""
        diffs = [f"{f.name}: {local_name} {getattr(self, f.name)!r} vs {remote_name} "
                 f"{getattr(remote, f.name)!r}"
                 for f in fields(self) if f.name != "tensor_parallel_size"
                 and getattr(self, f.name) != getattr(remote, f.name)]
        if diffs:
            raise KVLayoutMismatch("KV cache layouts are incompatible: " + "; ".join(diffs))

    def head_map(self, dst: KVLayout) -> tuple[tuple[HeadSlice, ...], ...]:
        """Per rank of `dst` (the receiving server's layout), the slices of its heads and the rank of
        this (sending) layout each comes from, so that each destination rank receives exactly its own
        heads. A head several source ranks hold (replicated) comes from the rank of the same index
        when it holds it, else from the first. KVLayoutMismatch when the layouts differ beyond the
        tensor-parallel size."""
        return _head_map(self, dst)

    def maps_whole_blocks(self, dst: KVLayout) -> bool:
        """True when every destination rank's heads are exactly one source rank's (a block moves as
        one contiguous range); otherwise a block's rows are cut by heads."""
        return all(len(slices) == 1 and slices[0].count == self.heads_per_rank == dst.heads_per_rank
                   for slices in self.head_map(dst))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the handshake."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> KVLayout:
        """Parse a handshake dict; raises ValueError naming a missing or bad field (a missing
        tensor_parallel_size is 1)."""
        if not isinstance(data, dict):
            raise ValueError(f"layout must be an object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "tensor_parallel_size"]
        if missing:
            raise ValueError(f"layout is missing fields {missing}")
        return cls(**{n: data[n] for n in names if n in data})

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

    @classmethod
    def of_ranks(cls, rank_kv_caches: list[list[tuple[torch.Tensor, torch.Tensor]]], num_kv_heads: int) -> KVLayout:
        """The layout of a tensor-parallel server's caches: per rank, per layer (K, V), each
        [num_blocks, block_size, heads_per_rank, head_dim]; num_kv_heads is the model's."""
        one = cls.from_kv_caches(rank_kv_caches[0])
        layout = cls(one.num_layers, num_kv_heads, one.head_dim, one.block_size, one.dtype, len(rank_kv_caches))
        if layout.heads_per_rank != one.num_kv_heads:
            raise ValueError(f"a rank's cache holds {one.num_kv_heads} KV heads; {num_kv_heads} heads over "
                             f"{len(rank_kv_caches)} ranks make {layout.heads_per_rank}")
        return layout

    def check_cache_tensor(self, tensor: torch.Tensor, what: str) -> None:
        """Raise ValueError unless `tensor` is a contiguous [N, block_size, heads, head_dim] of dtype."""
        if dtype_name(tensor.dtype) != self.dtype:
            raise ValueError(f"{what} has dtype {dtype_name(tensor.dtype)}, the layout says {self.dtype}")
        expected = (self.block_size, self.heads_per_rank, self.head_dim)
        if tensor.dim() != 4 or tuple(tensor.shape[1:]) != expected:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}, the layout needs "
                             f"[num_blocks, {', '.join(map(str, expected))}]")
        if not tensor.is_contiguous():
            raise ValueError(f"{what} must be contiguous")

    def check_rank_caches(self, rank_kv_caches: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> int:
        """Check every rank's (K, V) pairs against the layout; returns the number of blocks (the same on
        every rank)."""
        if len(rank_kv_caches) != self.tensor_parallel_size:
            raise ValueError(f"caches of {len(rank_kv_caches)} ranks, the layout has {self.tensor_parallel_size}")
        counts = {self.check_kv_caches(caches) for caches in rank_kv_caches}
        if len(counts) != 1:
            raise ValueError(f"the ranks' caches have different block counts {sorted(counts)}")
        return counts.pop()

    def check_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Check one rank's (K, V) pairs against the layout; returns the number of blocks (same for all)."""
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


@functools.lru_cache(maxsize=256)
def _head_map(src: KVLayout, dst: KVLayout) -> tuple[tuple[HeadSlice, ...], ...]:
    """KVLayout.head_map, computed once per pair of layouts (a receiver asks for every READY)."""
    src.check_compatible(dst, "sender", "receiver")
    plan = []
    for r in range(dst.tensor_parallel_size):
        slices: list[HeadSlice] = []
        for dst_head, head in enumerate(dst.rank_heads(r)):
            holders = [p for p in range(src.tensor_parallel_size) if head in src.rank_heads(p)]
            owner = r if r in holders else holders[0]
            src_head = head - src.rank_heads(owner).start
            last = slices[-1] if slices else None
            if (last is not None and last.src_rank == owner and last.src_head + last.count == src_head
                    and last.dst_head + last.count == dst_head):
                slices[-1] = HeadSlice(r, owner, last.src_head, last.dst_head, last.count + 1)
            else:
                slices.append(HeadSlice(r, owner, src_head, dst_head, 1))
        plan.append(tuple(slices))
    return tuple(plan)
