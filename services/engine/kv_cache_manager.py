"""Block tables of sequences on top of the BlockPool: prefix hits, growth, forks, copy-on-write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.engine.block_pool import ROOT_HASH, ROOT_UID, BlockPool, KVBlock
from pdserve.engine.request import Sample


@dataclass
class CachedPrefix:
    """The longest run of a sequence's leading full blocks found in the prefix cache."""

    blocks: list[KVBlock] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)


class KVCacheManager:
    """Gives sequences the blocks they need for each step and takes them back.

    A plan is a list of (sequence, number of new tokens to compute this step). Growing a
    sequence may also need a private copy of a block it shares (copy-on-write); the copies to
    make are returned as (src, dst) block-id pairs for the runner's copy_blocks.
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens positions."""
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sample, max_tokens: int) -> CachedPrefix:
        """Leading full blocks of seq's first max_tokens tokens that the prefix cache holds."""
        return self._cached_prefix(seq.token_slice, max_tokens)

    def find_cached_tokens(self, token_ids: Sequence[int]) -> CachedPrefix:
        """Leading full blocks of token_ids that the prefix cache holds."""
        return self._cached_prefix(lambda start, end: token_ids[start:end], len(token_ids))

    def _cached_prefix(self, token_slice: Callable[[int, int], Sequence[int]], max_tokens: int) -> CachedPrefix:
        prefix = CachedPrefix()
        if not self.pool.enable_caching:
            return prefix
        parent_hash, parent_uid = ROOT_HASH, ROOT_UID
        bs = self.block_size
        for k in range(max_tokens // bs):
            tokens = tuple(token_slice(k * bs, (k + 1) * bs))
            key, block = self.pool.lookup(parent_hash, parent_uid, tokens)
            if block is None:
                break
            prefix.blocks.append(block)
            prefix.hashes.append(key)
            prefix.uids.append(block.uid)
            parent_hash, parent_uid = key, block.uid
        return prefix

    def admit(self, seq: Sample, prefix: CachedPrefix, num_new_tokens: int) -> bool:
        """Give a sequence without blocks its cached prefix plus blocks for num_new_tokens
        more; False (and nothing changed) when the pool cannot supply them."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        num_cached = len(prefix.blocks) * self.block_size
        num_new_blocks = self.blocks_for(num_cached + num_new_tokens) - len(prefix.blocks)
        free_hits = sum(1 for b in prefix.blocks if b.ref_count == 0)
        if num_new_blocks > self.pool.num_free_blocks - free_hits:
            return False
        self.pool.touch(prefix.blocks)
        seq.block_table = list(prefix.blocks) + self.pool.allocate(num_new_blocks)
        seq.block_hashes = list(prefix.hashes)
        seq.prefix_uids = list(prefix.uids)
        seq.num_computed_tokens = num_cached
        return True

    def num_blocks_needed(self, plan: Sequence[tuple[Sample, int]]) -> int:
        """Exact count of new blocks `allocate(plan)` takes, copy-on-write copies included."""
        remaining_refs: dict[int, int] = {}
        needed = 0
        for seq, num_new in plan:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            for block in self._written_existing_blocks(seq, start, end):
                refs = remaining_refs.get(block.block_id, block.ref_count)
                if refs > 1:
                    needed += 1
                    remaining_refs[block.block_id] = refs - 1
            needed += max(0, self.blocks_for(end) - len(seq.block_table))
        return needed

    def allocate(self, plan: Sequence[tuple[Sample, int]]) -> list[tuple[int, int]] | None:
        """Make every planned sequence's table cover its new tokens, copying shared blocks it
        writes into. Returns the (src, dst) copies, or None (nothing changed) when short of blocks."""
        if self.num_blocks_needed(plan) > self.pool.num_free_blocks:
            return None
        copies: list[tuple[int, int]] = []
        for seq, num_new in plan:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            first = start // self.block_size
            for offset, block in enumerate(self._written_existing_blocks(seq, start, end)):
                if block.ref_count > 1:
                    (private,) = self.pool.allocate(1)
                    copies.append((block.block_id, private.block_id))
                    self.pool.free([block])
                    seq.block_table[first + offset] = private
            missing = self.blocks_for(end) - len(seq.block_table)
            if missing > 0:
                seq.block_table.extend(self.pool.allocate(missing))
        return copies

    def _written_existing_blocks(self, seq: Sample, start: int, end: int) -> list[KVBlock]:
        """Blocks already in seq's table that positions [start, end) write into."""
        if end <= start:
            return []
        last = min(len(seq.block_table), self.blocks_for(end))
        return seq.block_table[start // self.block_size:last]

    def fork(self, parent: Sample, children: Sequence[Sample]) -> None:
        """Let each child share all of the parent's blocks and computed tokens."""
        for child in children:
            if child.block_table:
                raise RuntimeError(f"sequence {child.seq_id} already holds blocks")
            self.pool.touch(parent.block_table)
            child.block_table = list(parent.block_table)
            child.block_hashes = list(parent.block_hashes)
            child.prefix_uids = list(parent.prefix_uids)
            child.num_computed_tokens = parent.num_computed_tokens

    def cache_full_blocks(self, seq: Sample) -> None:
        """Register the sequence's newly completed blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        bs = self.block_size
        for k in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_slice(k * bs, (k + 1) * bs))
            parent_hash = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            parent_uid = seq.prefix_uids[-1] if seq.prefix_uids else ROOT_UID
            key = self.pool.hash_fn(parent_hash, tokens)
            uid = self.pool.register(seq.block_table[k], key, parent_uid, tokens)
            seq.block_hashes.append(key)
            seq.prefix_uids.append(uid)

    def trim(self, seq: Sample, num_tokens: int) -> None:
        """Give back the blocks past the first blocks_for(num_tokens) of seq's table (taken for
        speculative tokens that were rejected; they hold no cached KV)."""
        keep = self.blocks_for(num_tokens)
        if len(seq.block_table) > keep:
            extra = seq.block_table[keep:]
            del seq.block_table[keep:]
            self.pool.free(reversed(extra))

    def free(self, seq: Sample) -> None:
        """Release all of a sequence's blocks (tail first) and forget its KV state."""
        self.pool.free(reversed(seq.block_table))
        seq.reset_kv_state()
