"""BlockPool / FreeBlockQueue / KVCacheManager: free queue, ref counts, eviction, hashes, CoW."""

from __future__ import annotations

import pytest

from pdserve.engine.block_pool import ROOT_HASH, ROOT_UID, BlockPool, FreeBlockQueue, KVBlock, NoFreeBlocksError
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Sample

BS = 4


def ids(blocks):
    return [b.block_id for b in blocks]


def seq_with(tokens, seq_id=0):
    return Sample(seq_id, 0, list(tokens))


# ---- FreeBlockQueue ----

def test_free_queue_order_and_middle_removal():
    blocks = [KVBlock(i) for i in range(6)]
    queue = FreeBlockQueue(blocks)
    assert ids(queue) == [0, 1, 2, 3, 4, 5] and len(queue) == 6
    queue.remove(blocks[3])
    queue.remove(blocks[0])
    assert ids(queue) == [1, 2, 4, 5] and len(queue) == 4
    queue.appendleft(blocks[3])
    queue.append(blocks[0])
    assert ids(queue) == [3, 1, 2, 4, 5, 0]
    assert queue.popleft() is blocks[3]
    assert ids(queue) == [1, 2, 4, 5, 0]


def test_free_queue_rejects_double_insert_and_missing_remove():
    blocks = [KVBlock(i) for i in range(2)]
    queue = FreeBlockQueue(blocks[:1])
    with pytest.raises(RuntimeError, match="already in the free queue"):
        queue.append(blocks[0])
    with pytest.raises(RuntimeError, match="not in the free queue"):
        queue.remove(blocks[1])
    queue.popleft()
    with pytest.raises(IndexError):
        queue.popleft()


def test_free_queue_removal_is_constant_time():
    # 200k removals from the middle: a search per removal would be ~10^10 steps.
    blocks = [KVBlock(i) for i in range(200_000)]
    queue = FreeBlockQueue(blocks)
    for block in blocks[1::2]:
        queue.remove(block)
    assert len(queue) == 100_000
    assert queue.popleft() is blocks[0] and queue.popleft() is blocks[2]


# ---- BlockPool: ref counts ----

def test_allocate_touch_free_ref_counts():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert (a.ref_count, b.ref_count, pool.num_free_blocks) == (1, 1, 2)
    pool.touch([a])
    assert a.ref_count == 2
    pool.free([a])
    assert a.ref_count == 1 and pool.num_free_blocks == 2
    pool.free([a, b])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a])
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(5)


def test_touch_free_cached_block_takes_it_out_of_queue():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    key = pool.hash_fn(ROOT_HASH, (1, 2, 3, 4))
    pool.register(block, key, ROOT_UID, (1, 2, 3, 4))
    pool.free([block])
    assert pool.num_free_blocks == 3 and block.is_cached
    pool.touch([block])  # a prefix hit on a free block
    assert block.ref_count == 1 and pool.num_free_blocks == 2
    assert block not in list(pool.free_queue)


# ---- BlockPool: lazy eviction, LRU ----

def _cache(pool, block, tokens, parent=(ROOT_HASH, ROOT_UID)):
    key = pool.hash_fn(parent[0], tuple(tokens))
    uid = pool.register(block, key, parent[1], tuple(tokens))
    return key, uid


def test_freed_cached_blocks_stay_cached_and_are_evicted_lru():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks[:3]):
        _cache(pool, block, [i] * BS)
    # Free in the order 2, 0, 1 (cached) and 3 (not cached).
    pool.free([blocks[2], blocks[0], blocks[1], blocks[3]])
    assert pool.num_cached_blocks == 3
    assert ids(pool.free_queue) == [3, 2, 0, 1]  # uncached first, then cached least-recently-freed
    (first,) = pool.allocate(1)
    assert first is blocks[3] and pool.num_cached_blocks == 3
    (second,) = pool.allocate(1)
    assert second is blocks[2] and not second.is_cached and pool.num_cached_blocks == 2
    _, hit = pool.lookup(ROOT_HASH, ROOT_UID, (2,) * BS)
    assert hit is None  # evicted
    _, hit = pool.lookup(ROOT_HASH, ROOT_UID, (0,) * BS)
    assert hit is blocks[0]


# ---- hash chain + token check ----

def test_hash_chain_distinguishes_parents():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    key_a, uid_a = _cache(pool, a, [1] * BS)
    key_c, uid_c = _cache(pool, c, [3] * BS)
    _cache(pool, b, [2] * BS, parent=(key_a, uid_a))
    _, hit = pool.lookup(key_a, uid_a, (2,) * BS)
    assert hit is b
    _, hit = pool.lookup(key_c, uid_c, (2,) * BS)
    assert hit is None  # same tokens after another prefix
    _, hit = pool.lookup(ROOT_HASH, ROOT_UID, (2,) * BS)
    assert hit is None


def test_hash_collision_never_returns_other_tokens():
    pool = BlockPool(4, hash_fn=lambda parent, tokens: 42)  # every block collides
    a, b = pool.allocate(2)
    key, uid_a = _cache(pool, a, [1] * BS)
    _, hit = pool.lookup(ROOT_HASH, ROOT_UID, (9,) * BS)
    assert hit is None  # same key, other tokens
    _, hit = pool.lookup(key, uid_a, (1,) * BS)
    assert hit is None  # same key and tokens, but another parent (a, not the root)
    _, hit = pool.lookup(ROOT_HASH, ROOT_UID, (1,) * BS)
    assert hit is a
    # Registering colliding other content replaces the entry; the old block is no longer cached.
    _cache(pool, b, [7] * BS)
    assert not a.is_cached and b.is_cached and pool.num_cached_blocks == 1
    assert pool.lookup(ROOT_HASH, ROOT_UID, (1,) * BS)[1] is None


def test_child_of_an_evicted_parent_entry_is_not_matched():
    pool = BlockPool(2)
    parent, child = pool.allocate(2)
    key_p, uid_p = _cache(pool, parent, [1] * BS)
    _cache(pool, child, [2] * BS, parent=(key_p, uid_p))
    pool.free([parent])
    pool.free([child])
    (reused,) = pool.allocate(1)  # evicts the parent entry (least recently freed)
    assert reused is parent and not parent.is_cached and child.is_cached
    key_again, uid_again = _cache(pool, reused, [1] * BS)  # the same tokens, a new entry
    assert key_again == key_p and uid_again != uid_p
    # The child was computed after the old entry; it only matches behind that exact entry.
    assert pool.lookup(key_p, uid_again, (2,) * BS)[1] is None
    assert pool.lookup(key_p, uid_p, (2,) * BS)[1] is child


def test_equal_registration_returns_existing_uid_and_keeps_block_uncached():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    _, uid_a = _cache(pool, a, [5] * BS)
    _, uid_b = _cache(pool, b, [5] * BS)
    assert uid_b == uid_a and not b.is_cached and pool.num_cached_blocks == 1


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    _cache(pool, a, [1] * BS)
    assert pool.num_cached_blocks == 0
    assert pool.lookup(ROOT_HASH, ROOT_UID, (1,) * BS)[1] is None


# ---- KVCacheManager: prefix hits, free order, copy-on-write ----

def _computed(kv, seq, num_tokens):
    """Allocate for and mark num_tokens more tokens as computed (what the engine does per step)."""
    assert kv.allocate([(seq, num_tokens)]) == []
    seq.num_computed_tokens += num_tokens
    kv.cache_full_blocks(seq)


def test_prefix_hit_requires_whole_chain_and_is_reused():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    tokens = list(range(10))  # two full blocks + 2 tokens
    first = seq_with(tokens)
    _computed(kv, first, 10)
    assert pool.num_cached_blocks == 2
    second = seq_with(tokens[:8] + [99, 98, 97], seq_id=1)
    prefix = kv.find_cached_prefix(second, second.num_tokens - 1)
    assert prefix.blocks == first.block_table[:2]
    assert kv.admit(second, prefix, 3)
    assert second.num_computed_tokens == 8 and len(second.block_table) == 3
    assert [b.ref_count for b in second.block_table[:2]] == [2, 2]
    third = seq_with([0, 1, 2, 77] + tokens[4:], seq_id=2)  # first block differs: no hit at all
    assert kv.find_cached_prefix(third, 9).blocks == []


def test_admit_counts_free_hits_against_free_blocks():
    pool = BlockPool(3)
    kv = KVCacheManager(pool, BS)
    first = seq_with(range(8))
    _computed(kv, first, 8)
    kv.free(first)
    assert pool.num_free_blocks == 3
    second = seq_with(list(range(8)) + list(range(50, 59)), seq_id=1)
    prefix = kv.find_cached_prefix(second, second.num_tokens - 1)
    assert len(prefix.blocks) == 2
    # 2 hits (both free) + 9 new tokens need 3 new blocks, but only 1 free block is not a hit.
    assert not kv.admit(second, prefix, 9)
    assert pool.num_free_blocks == 3 and second.block_table == []
    assert kv.admit(second, prefix, 4)


def test_free_puts_sequence_tail_first_so_tail_is_evicted_first():
    pool = BlockPool(3)
    kv = KVCacheManager(pool, BS)
    seq = seq_with(range(12))
    _computed(kv, seq, 12)
    table = list(seq.block_table)
    kv.free(seq)
    assert ids(pool.free_queue) == [table[2].block_id, table[1].block_id, table[0].block_id]
    assert seq.block_table == [] and seq.num_computed_tokens == 0


def test_copy_on_write_first_writer_copies_last_writer_keeps():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    parent = seq_with(range(6))  # block 0 full, block 1 holds 2 of 4 tokens
    _computed(kv, parent, 6)
    children = [Sample(i, i, parent.prompt_token_ids) for i in (1, 2)]
    kv.fork(parent, children)
    shared_partial = parent.block_table[1]
    assert shared_partial.ref_count == 3 and parent.block_table[0].ref_count == 3
    assert pool.num_free_blocks == 6  # the prompt is held once
    plan = [(children[0], 1), (children[1], 1), (parent, 1)]
    assert kv.num_blocks_needed(plan) == 2
    copies = kv.allocate(plan)
    new_blocks = [children[0].block_table[1], children[1].block_table[1]]
    assert copies == [(shared_partial.block_id, b.block_id) for b in new_blocks]
    assert parent.block_table[1] is shared_partial and shared_partial.ref_count == 1
    assert all(c.block_table[0] is parent.block_table[0] for c in children)
    assert pool.num_free_blocks == 4


def test_allocate_is_all_or_nothing():
    pool = BlockPool(3)
    kv = KVCacheManager(pool, BS)
    a, b = seq_with(range(4)), seq_with(range(4), seq_id=1)
    _computed(kv, a, 4)
    assert kv.allocate([(a, 4), (b, 8)]) is None  # needs 3, 2 free
    assert len(a.block_table) == 1 and b.block_table == [] and pool.num_free_blocks == 2
