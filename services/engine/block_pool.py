"""The pool of physical KV blocks: reference counts, an O(1) free queue, and the prefix cache.

A block whose reference count drops to 0 goes back to the free queue. If it holds a prefix-cache
entry it keeps that entry (lazy eviction) and waits at the tail of the queue; allocation takes
blocks from the head, so cached blocks are evicted in least-recently-freed order and only when
no other free block is left ahead of them. Free blocks without an entry go to the head, to be
reused before any cached block.

A prefix-cache entry is keyed by the chained hash of (parent hash, tuple of the block's tokens).
A lookup is a hit only if the entry's tokens equal the query tokens *and* the entry's parent is
the exact entry the previous block matched (entries carry never-reused uids), so a hash
collision can cost a cache miss but never returns KV computed for other tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

ROOT_HASH = 0x5044534552564531  # parent hash of a sequence's first block ("PDSERVE1")
ROOT_UID = 0  # parent uid of a sequence's first block; entry uids start at 1


@dataclass(eq=False)
class KVBlock:
    """One physical KV block. Free iff ref_count == 0; cached iff block_hash is not None."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens whose KV this block holds (when cached)
    parent_uid: int = ROOT_UID  # uid of the entry for the block before this one in its sequence
    uid: int = ROOT_UID  # this entry's uid (unique over the pool's lifetime)
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)

    @property
    def is_cached(self) -> bool:
        """True while the block holds a prefix-cache entry."""
        return self.block_hash is not None


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) append, appendleft, popleft and remove.

    Uses the blocks' own prev_free/next_free links and two sentinels, so removing a block from
    the middle (a prefix-cache hit on a free block) needs no search.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def _insert_between(self, block: KVBlock, before: KVBlock, after: KVBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise RuntimeError(f"block {block.block_id} is already in the free queue")
        block.prev_free, block.next_free = before, after
        before.next_free = block
        after.prev_free = block
        self._len += 1

    def append(self, block: KVBlock) -> None:
        """Put a block at the tail (evicted last)."""
        self._insert_between(block, self._tail.prev_free, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        """Put a block at the head (reused first)."""
        self._insert_between(block, self._head, self._head.next_free)

    def remove(self, block: KVBlock) -> None:
        """Unlink a block from anywhere in the queue in O(1)."""
        if block.prev_free is None or block.next_free is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVBlock:
        """Remove and return the head block."""
        if self._len == 0:
            raise IndexError("the free block queue is empty")
        block = self._head.next_free
        self.remove(block)
        return block


def chained_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: hash of (parent hash, the block's tokens)."""
    return hash((parent_hash, token_ids))


class NoFreeBlocksError(RuntimeError):
    """More blocks were requested than the pool has free (callers check num_free_blocks first)."""


class BlockPool:
    """All physical blocks of one KV cache, their reference counts and the prefix cache.

    hash_fn(parent_hash, token_ids) -> int computes block keys (tests pass a colliding one).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 hash_fn: Callable[[int, tuple[int, ...]], int] = chained_hash) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.hash_fn = hash_fn
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[int, KVBlock] = {}
        self._next_uid = ROOT_UID + 1
        self._events: list[tuple[bool, int]] | None = None  # (stored?, key) in order, once recording

    def record_events(self) -> None:
        """Start keeping a log of prefix-cache entries stored and evicted (for KV-aware routing:
        pdserve.state.kv_events publishes it)."""
        if self._events is None:
            self._events = []

    def drain_events(self) -> list[tuple[bool, int]]:
        """The (stored, key) events since the last drain, oldest first (stored False: evicted). Safe to
        call from another thread than the engine's: the log is swapped, not copied."""
        if self._events is None:
            return []
        events, self._events = self._events, []
        return events

    def cached_keys(self) -> list[int]:
        """The keys of every prefix-cache entry now (a snapshot; safe from another thread under the GIL)."""
        return list(self.cached)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, cached ones included (they are evicted on demand)."""
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a prefix-cache entry, in use or free."""
        return len(self.cached)

    def allocate(self, count: int) -> list[KVBlock]:
        """Take `count` blocks from the head of the free queue (evicting their cache entries)."""
        if count > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self.free_queue)} free")
        taken = []
        for _ in range(count):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add one reference to each block (a cache hit or a fork); free ones leave the queue."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in the given order; pass a sequence's blocks
        last-first so that its tail is evicted before its head."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.is_cached:
                    self.free_queue.append(block)
                else:
                    self.free_queue.appendleft(block)

    def lookup(self, parent_hash: int, parent_uid: int, token_ids: tuple[int, ...]
               ) -> tuple[int, KVBlock | None]:
        """(key, block) for a full block of tokens after the entry `parent_uid`; block is None
        on a miss (absent key, other tokens, or another parent behind a colliding hash)."""
        key = self.hash_fn(parent_hash, token_ids)
        if not self.enable_caching:
            return key, None
        block = self.cached.get(key)
        if block is None or block.token_ids != token_ids or block.parent_uid != parent_uid:
            return key, None
        return key, block

    def register(self, block: KVBlock, key: int, parent_uid: int, token_ids: tuple[int, ...]) -> int:
        """Make a full, owned block a cache entry; returns the uid that stands for its prefix.

        If an equal entry exists already its uid is returned and `block` stays uncached; an
        entry with the same key but other content (a collision) is replaced.
        """
        if not self.enable_caching:
            return ROOT_UID
        existing = self.cached.get(key)
        if existing is not None:
            if existing.token_ids == token_ids and existing.parent_uid == parent_uid:
                return existing.uid
            self._evict(existing)
        if block.is_cached:
            raise RuntimeError(f"block {block.block_id} already holds a cache entry")
        block.block_hash, block.token_ids, block.parent_uid = key, token_ids, parent_uid
        block.uid = self._next_uid
        self._next_uid += 1
        self.cached[key] = block
        if self._events is not None:
            self._events.append((True, key))
        return block.uid

    def _evict(self, block: KVBlock) -> None:
        """Drop a block's cache entry, if any (its KV stays valid for current owners)."""
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            if self._events is not None:
                self._events.append((False, block.block_hash))
        block.block_hash = None
        block.token_ids = None
        block.parent_uid = ROOT_UID
        block.uid = ROOT_UID

    def reset_prefix_cache(self) -> int:
        """Drop every cache entry of free blocks; returns how many were dropped."""
        dropped = [b for b in self.cached.values() if b.ref_count == 0]
        for block in dropped:
            self._evict(block)
            self.free_queue.remove(block)
            self.free_queue.appendleft(block)
        return len(dropped)
