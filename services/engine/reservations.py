"""Decode-side reservations: KV blocks held for a prompt whose KV another server is sending.

A reservation takes blocks from the pool outside the scheduler (so they count as used, never as
free) until either a request takes them over (LLMEngine.add_prefilled_request) or it is
released. Expiry is optional: a reservation made with `expires_at` is released by
`expire(now)` once `now >= expires_at` (any clock, as long as the caller uses the same one).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from pdserve.engine.block_pool import BlockPool, KVBlock
from pdserve.engine.kv_cache_manager import CachedPrefix
from pdserve.runtime.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PromptTooLongError,
)


@dataclass(eq=False)
class BlockReservation:
    """Engine blocks held for the KV of num_prompt_tokens prompt tokens that another server sends,
    in logical order: the token at position p goes to blocks[p // block_size], offset
    p % block_size. expires_at is the engine's safety net, later than the server's KVLease.
    The first held_blocks blocks are prefix-cache hits this engine already holds (pinned: one more
    reference each) for held_tokens, the prompt's first held_blocks * block_size tokens; only the
    blocks after them receive KV."""

    reservation_id: str
    num_prompt_tokens: int
    blocks: list[KVBlock]
    expires_at: float | None = None
    held_blocks: int = 0
    held_tokens: tuple[int, ...] = ()

    @property
    def block_ids(self) -> list[int]:
        """The physical ids of the reserved blocks, in logical order."""
        return [b.block_id for b in self.blocks]


class ReservationBook:
    """The open reservations of one engine, by id. Not thread-safe (the engine's thread owns it)."""

    def __init__(self, pool: BlockPool, block_size: int, max_model_len: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_model_len = max_model_len
        self._by_id: dict[str, BlockReservation] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, reservation_id: object) -> bool:
        return reservation_id in self._by_id

    @property
    def num_blocks(self) -> int:
        """Blocks all open reservations wait to fill (their held prefix-cache blocks not counted:
        those hold KV already, and may be shared with running sequences)."""
        return sum(len(r.blocks) - r.held_blocks for r in self._by_id.values())

    def reserve(self, reservation_id: str, num_prompt_tokens: int,
                expires_at: float | None = None, held: CachedPrefix | None = None,
                held_tokens: tuple[int, ...] = ()) -> BlockReservation:
        """Take blocks for a prompt of num_prompt_tokens tokens (evicting free prefix-cache
        blocks if needed). held: the prompt's leading blocks found in the prefix cache (for
        held_tokens, its first len(held.blocks) * block_size tokens): they are pinned and lead
        the reservation instead of fresh blocks.

        Raises InvalidRequestError (bad id or count), AlreadyExistsError (id in use),
        PromptTooLongError (the prompt can never fit this engine) or OverloadedError (not
        enough free blocks now).
        """
        if not isinstance(reservation_id, str) or not reservation_id:
            raise InvalidRequestError(f"reservation_id must be a non-empty string, got {reservation_id!r}")
        if reservation_id in self._by_id:
            raise AlreadyExistsError(f"reservation {reservation_id!r} already exists")
        if (not isinstance(num_prompt_tokens, numbers.Integral) or isinstance(num_prompt_tokens, bool)
                or num_prompt_tokens < 1):
            raise InvalidRequestError(
                f"reservation {reservation_id!r}: num_prompt_tokens must be an int >= 1, got {num_prompt_tokens!r}")
        if num_prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"reservation {reservation_id!r}: a prompt of {num_prompt_tokens} tokens leaves no room "
                f"for output within max_model_len {self.max_model_len}")
        needed = -(-int(num_prompt_tokens) // self.block_size)
        if needed > self.pool.num_blocks:
            raise PromptTooLongError(
                f"reservation {reservation_id!r}: {num_prompt_tokens} tokens need {needed} KV blocks, "
                f"the engine has {self.pool.num_blocks}")
        held_blocks = list(held.blocks) if held is not None else []
        if len(held_blocks) > needed or len(held_tokens) != len(held_blocks) * self.block_size:
            raise InvalidRequestError(f"reservation {reservation_id!r}: {len(held_blocks)} held blocks for "
                                      f"{len(held_tokens)} tokens do not fit a prompt of {num_prompt_tokens}")
        free_hits = sum(1 for b in held_blocks if b.ref_count == 0)  # pinning takes them off the free queue
        if needed - len(held_blocks) > self.pool.num_free_blocks - free_hits:
            raise OverloadedError(
                f"reservation {reservation_id!r}: {num_prompt_tokens} tokens need {needed - len(held_blocks)} KV "
                f"blocks{f' beside {len(held_blocks)} cached' if held_blocks else ''}, "
                f"{self.pool.num_free_blocks - free_hits} are free")
        self.pool.touch(held_blocks)
        reservation = BlockReservation(reservation_id, int(num_prompt_tokens),
                                       held_blocks + self.pool.allocate(needed - len(held_blocks)), expires_at,
                                       len(held_blocks), tuple(held_tokens))
        self._by_id[reservation_id] = reservation
        return reservation

    def take(self, reservation_id: str) -> BlockReservation:
        """Close a reservation and hand its blocks to the caller, who must either give them
        to a request or pass the reservation to free(). NotFoundError when unknown."""
        reservation = self._by_id.pop(reservation_id, None)
        if reservation is None:
            raise NotFoundError(f"reservation {reservation_id!r} does not exist (never made, "
                                f"released, expired or already used)")
        return reservation

    def free(self, reservation: BlockReservation) -> None:
        """Return the blocks of a reservation obtained from take() to the pool."""
        self.pool.free(reversed(reservation.blocks))
        reservation.blocks = []

    def release(self, reservation_id: str) -> bool:
        """Free a reservation's blocks; False (and nothing done) when it is not open."""
        reservation = self._by_id.pop(reservation_id, None)
        if reservation is None:
            return False
        self.free(reservation)
        return True

    def extend(self, reservation_id: str, expires_at: float) -> bool:
        """Move an open reservation's expiry to expires_at; False when it is not open."""
        reservation = self._by_id.get(reservation_id)
        if reservation is None:
            return False
        reservation.expires_at = expires_at
        return True

    def expire(self, now: float) -> list[str]:
        """Release every reservation whose expires_at <= now; returns their ids."""
        expired = [r.reservation_id for r in self._by_id.values()
                   if r.expires_at is not None and r.expires_at <= now]
        for reservation_id in expired:
            self.release(reservation_id)
        return expired
