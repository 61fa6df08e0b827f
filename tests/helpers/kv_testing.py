"""KV transfer test helpers: a small layout, random and zeroed caches, block comparisons, and
an on_complete recorder the receiver's threads report to."""

from __future__ import annotations

import threading

import torch

from pdserve.kvtransfer import KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
NUM_BLOCKS = 32


def random_caches(layout: KVLayout, num_blocks: int, seed: int = 0):
    """Per layer (K, V) [num_blocks, block_size, heads, head_dim] of random bytes (NaN patterns too)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim * elem)
    return [tuple(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype) for _ in "kv")
            for _ in range(layout.num_layers)]


def zero_caches(layout: KVLayout, num_blocks: int):
    dtype = getattr(torch, layout.dtype)
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(layout.num_layers)]


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def assert_blocks_equal(dst_caches, dst_ids, src_caches, src_ids, layers=None):
    for layer in layers if layers is not None else range(len(dst_caches)):
        for half in (0, 1):
            assert torch.equal(raw_bytes(dst_caches[layer][half][dst_ids]),
                               raw_bytes(src_caches[layer][half][src_ids])), f"layer {layer} half {half}"


def assert_blocks_zero(caches, block_ids, layers=None):
    for layer in layers if layers is not None else range(len(caches)):
        for half in (0, 1):
            assert not raw_bytes(caches[layer][half][block_ids]).any(), f"layer {layer} half {half} written"


class Outcomes:
    """Records on_complete calls (from the receiver's threads) and waits for them."""

    def __init__(self):
        self.calls: dict[str, list] = {}
        self._cond = threading.Condition()

    def __call__(self, reservation_id, error):
        with self._cond:
            self.calls.setdefault(reservation_id, []).append(error)
            self._cond.notify_all()

    def wait(self, reservation_id, timeout=10.0):
        with self._cond:
            assert self._cond.wait_for(lambda: reservation_id in self.calls, timeout), \
                f"no on_complete for {reservation_id}"
            assert len(self.calls[reservation_id]) == 1, "on_complete called more than once"
            return self.calls[reservation_id][0]


def send_all(transfer, src_caches, src_ids):
    for layer, (key, value) in enumerate(src_caches):
        transfer.send_layer(layer, key, value, src_ids)
