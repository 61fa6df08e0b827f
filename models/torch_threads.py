"""Running a block of torch work on one CPU thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block, then restore the thread count: reductions
    are deterministic, tiny matmuls gain nothing from threads, and on a busy machine spinning
    OpenMP threads can make small steps 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
