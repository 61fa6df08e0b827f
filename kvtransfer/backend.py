"""The backend interface: how KV blocks move from a prefill server's cache into a decode server's
reserved blocks. TCP is the first backend (tcp_sender / tcp_receiver); its connection also carries
the control of NIXL transfers, whose bytes the receiver READs (nixl_data.py); others implement the
same three classes.

Life of a transfer:
    decode side:  receiver.expect(reservation_id, dst_block_ids, num_tokens, on_complete)
    prefill side: transfer = sender.open(endpoint, reservation_id, num_tokens)   # handshake
                  for each layer i as soon as its K/V are computed (ModelRunner layer_done hook):
                      transfer.send_layer(i, key_cache_i, value_cache_i, src_block_ids)
                  stats = transfer.finish(timeout)       # returns once the receiver holds all of it
    decode side:  on_complete(reservation_id, None) -- or an exception if the transfer failed
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

OnComplete = Callable[[str, "Exception | None"], None]


@dataclass(frozen=True)
class TransferStats:
    """What one transfer moved: K/V payload bytes, LAYER (or READY) frames, blocks per layer, the
    seconds from open() until the receiver confirmed the whole KV was written, and how the bytes
    moved ("tcp" or "nixl")."""

    bytes: int
    frames: int
    blocks: int
    seconds: float
    data_path: str = "tcp"


@dataclass(frozen=True)
class ReceivedTransfer:
    """What a receiver saw of one transfer that ended (for tracing and metrics): the sender's
    handshake metadata (e.g. W3C trace context), K/V payload bytes written, blocks per layer,
    when the handshake bound the reservation (Unix ns), the seconds from then until it ended,
    the error when it failed (None: the whole KV is in), and how the bytes moved ("tcp", "nixl")."""

    reservation_id: str
    metadata: dict[str, str]
    bytes: int
    blocks: int
    started_unix_ns: int
    seconds: float
    error: Exception | None
    data_path: str = "tcp"


TransferObserver = Callable[[ReceivedTransfer], None]


class KVTransfer(ABC):
    """One prompt's KV on its way to one reservation (prefill side)."""

    def send_layer(self, layer: int, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   src_block_ids: Sequence[int], first_block: int = 0, snapshot: bool = False) -> None:
        """Queue layer `layer`'s blocks for sending and return at once (a server of one rank).

        key_cache, value_cache: the sender's cache of that layer, each [num_blocks, block_size,
        num_kv_heads, head_dim]; src_block_ids: its physical blocks holding the reservation's logical
        blocks first_block, first_block + 1, ... (all of them by default; a part for chunked prefill).
        The blocks are read later, on the sending thread: they must stay unchanged until finish() or
        cancel() returns, unless snapshot=True (a copy is taken now; always so off the CPU). On the
        nixl data path the receiver reads them in place and snapshot=True is refused."""
        self.send_layer_ranks(layer, [(key_cache, value_cache)], src_block_ids, first_block, snapshot)

    @abstractmethod
    def send_layer_ranks(self, layer: int, rank_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         src_block_ids: Sequence[int], first_block: int = 0, snapshot: bool = False) -> None:
        """send_layer for a tensor-parallel server: rank_caches holds every rank's (K, V) of that layer,
        rank 0 first, each [num_blocks, block_size, heads_per_rank, head_dim] (the block ids are the
        same on every rank). The transfer maps heads to the receiver's ranks (KVLayout.head_map)."""

    @abstractmethod
    def finish(self, timeout: float | None = None) -> TransferStats:
        """Send the end marker and wait until the receiver has written everything (over NIXL: has
        read everything; its on_complete follows when it gets the CONFIRM this sends); raises
        KVTransferError (or a subclass) if the transfer failed, TimeoutError after `timeout`
        seconds (the transfer is then cancelled)."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up: the receiver reports the reservation failed. Idempotent; after it returns the
        source blocks are no longer read."""


class KVSenderBackend(ABC):
    """Opens transfers to receivers (prefill side)."""

    @abstractmethod
    def open(self, endpoint: str, reservation_id: str, num_tokens: int,
             dst_block_ids: Sequence[int] | None = None, metadata: dict[str, str] | None = None,
             timeout: float | None = None, held_blocks: int = 0) -> KVTransfer:
        """Handshake with the receiver at `endpoint` for reservation_id holding num_tokens tokens.
        dst_block_ids, if given, must equal the reserved blocks (a routing check); metadata travels
        in the handshake (e.g. W3C trace context). held_blocks: leading blocks the receiver holds
        already (its prefix cache): they are not sent, and the receiver must agree. Raises
        KVLayoutMismatch, UnknownReservation, KVAuthError or KVTransferError with a message naming
        the cause."""


class KVReceiverBackend(ABC):
    """Accepts transfers into reserved blocks of a decode server's cache."""

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where senders connect (e.g. 'host:port'), as advertised to the router."""

    @abstractmethod
    def start(self) -> str:
        """Start serving; returns the endpoint."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving; pending reservations fail."""

    @abstractmethod
    def expect(self, reservation_id: str, dst_block_ids: list[int], num_tokens: int,
               on_complete: OnComplete, held_blocks: int = 0) -> None:
        """Register reserved blocks (the first held_blocks of them hold their KV already and are
        never written); on_complete(reservation_id, error_or_None) is called once, from a backend
        thread, unless cancel() comes first."""

    @abstractmethod
    def cancel(self, reservation_id: str) -> bool:
        """Forget a reservation; afterwards nothing is written into its blocks."""

    @abstractmethod
    def has_sender(self, reservation_id: str) -> bool:
        """True while a live sender is attached to the reservation (its lease is then renewed)."""
