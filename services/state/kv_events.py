"""What each worker's prefix cache holds, published for the router's KV-aware routing.

Workers (prefill, decode and colocated servers) append to one Redis stream, `{prefix}:kv-events`,
entries naming the worker, its role and block size: every period the prefix-cache entries
stored and evicted since the last one, in order (keyed by the chained block hash the engine's
prefix cache computes, pdserve.engine.block_pool.chained_hash), and every `snapshot_every`
periods the whole set. A stream rather than pub/sub: a router that starts or reconnects reads
what the stream retains (trimmed to about MAX_STREAM_ENTRIES) and is correct once each worker's
next snapshot arrives, instead of missing what was published while it was away. Publishing runs
on the worker's event loop from a log the engine thread appends to; it never blocks a step.

The router's PrefixIndex applies the stream in order (a snapshot replaces a worker's set, events
add and remove) and answers how many of a prompt's leading tokens a worker holds. A stale index
costs a cache miss, never a wrong token: the worker's engine looks its cache up itself (a decode
server reports what it holds when it grants a reservation, and only the rest is transferred).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from pdserve.engine.block_pool import ROOT_HASH, BlockPool, chained_hash

logger = logging.getLogger("pdserve.kv_events")
MAX_STREAM_ENTRIES = 10_000
FORGET_AFTER_S = 60.0  # a worker silent this long (6 snapshot periods at the default 1 s beat) is dropped
READ_BLOCK_MS = 1000
RETRY_S = 1.0


def stream_key(prefix: str) -> str:
    """The Redis stream the workers of one deployment publish to."""
    return f"{prefix}:kv-events"


def prompt_block_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The prefix-cache keys of the prompt's full blocks, first block first (as the engine chains them)."""
    keys, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chained_hash(parent, tuple(token_ids[start:start + block_size]))
        keys.append(parent)
    return keys


class KVEventPublisher:
    """A worker's side: publishes its block pool's events every interval_s, and a snapshot of its
    whole prefix cache every snapshot_every intervals (the first one at once)."""

    def __init__(self, redis, prefix: str, worker_id: str, role: str, block_size: int, pool: BlockPool,
                 interval_s: float = 1.0, snapshot_every: int = 10):
        if interval_s <= 0 or snapshot_every < 1:
            raise ValueError("interval_s must be > 0 and snapshot_every >= 1")
        self.redis, self.stream = redis, stream_key(prefix)
        self.worker_id, self.role, self.block_size, self.pool = worker_id, role, block_size, pool
        self.interval_s, self.snapshot_every = interval_s, snapshot_every
        pool.record_events()
        self._ticks = 0

    async def publish_once(self) -> None:
        """Publish the events since the last call (and a snapshot when one is due)."""
        events = self.pool.drain_events()
        if events:
            await self._add("events", [[int(stored), key] for stored, key in events])
        if self._ticks % self.snapshot_every == 0:
            await self._add("snapshot", self.pool.cached_keys())
        self._ticks += 1

    async def _add(self, kind: str, data: list) -> None:
        """One entry; the stream's TTL (three snapshot periods) refreshed with it, so that it goes away with
        the last worker publishing to it (every key pdserve writes expires)."""
        ttl_ms = max(1000, int(3 * self.snapshot_every * self.interval_s * 1000))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.stream, {"worker": self.worker_id, "role": self.role, "block_size": self.block_size,
                                    "kind": kind, "data": json.dumps(data)},
                      maxlen=MAX_STREAM_ENTRIES, approximate=True)
            pipe.pexpire(self.stream, ttl_ms)
            await pipe.execute()

    async def run(self) -> None:
        """Publish every interval_s until cancelled; a Redis error costs that period's events (the
        next snapshot restores the router's view), never the worker."""
        while True:
            try:
                await self.publish_once()
            except (RedisError, OSError) as exc:
                logger.warning("publishing KV cache events failed: %s", exc)
                self._ticks = 0  # a snapshot as soon as Redis is back
            await asyncio.sleep(self.interval_s)


@dataclass
class WorkerBlocks:
    """What one worker's prefix cache holds, as far as the stream has said, and when it last said so
    (time.monotonic())."""

    block_size: int
    keys: set[int] = field(default_factory=set)
    heard_at: float = field(default_factory=time.monotonic)


class PrefixIndex:
    """The router's side: the prefix-cache keys each worker holds, kept from the stream."""

    def __init__(self, redis, prefix: str, forget_after_s: float = FORGET_AFTER_S):
        self.redis, self.stream = redis, stream_key(prefix)
        self.workers: dict[str, WorkerBlocks] = {}
        self.last_id = "0"  # from the start of what the stream retains
        self.forget_after_s = forget_after_s

    def apply(self, worker_id: str, block_size: int, kind: str, data: list) -> None:
        """One stream entry: a snapshot replaces the worker's keys; events add (1) and remove (0) in order."""
        if kind == "snapshot":
            self.workers[worker_id] = WorkerBlocks(block_size, {int(k) for k in data})
            return
        blocks = self.workers.setdefault(worker_id, WorkerBlocks(block_size))
        if blocks.block_size != block_size:
            self.workers[worker_id] = blocks = WorkerBlocks(block_size)
        blocks.heard_at = time.monotonic()
        for stored, key in data:
            if stored:
                blocks.keys.add(int(key))
            else:
                blocks.keys.discard(int(key))

    def forget_silent_workers(self, now: float | None = None) -> list[str]:
        """Drop the workers the stream has said nothing of for forget_after_s (they left: a live one
        publishes a snapshot every few seconds); returns their ids. Keeps the index's memory bounded
        as workers come and go."""
        now = time.monotonic() if now is None else now
        silent = [w for w, blocks in self.workers.items() if now - blocks.heard_at > self.forget_after_s]
        for worker_id in silent:
            del self.workers[worker_id]
        return silent

    def blocks_by_worker(self) -> dict[str, int]:
        """How many blocks the index holds for each worker (a metric)."""
        return {worker_id: len(blocks.keys) for worker_id, blocks in list(self.workers.items())}

    def cached_tokens(self, worker_id: str, token_ids: Sequence[int],
                      keys_by_block_size: dict[int, list[int]] | None = None) -> int:
        """Leading tokens of the prompt whose blocks the worker holds (0 when it is unknown).
        keys_by_block_size: the prompt's block keys already computed, reused across workers (filled in)."""
        blocks = self.workers.get(worker_id)
        if blocks is None or not blocks.keys:
            return 0
        keys_by_block_size = {} if keys_by_block_size is None else keys_by_block_size
        if blocks.block_size not in keys_by_block_size:
            keys_by_block_size[blocks.block_size] = prompt_block_keys(token_ids, blocks.block_size)
        held = 0
        for key in keys_by_block_size[blocks.block_size]:
            if key not in blocks.keys:
                break
            held += 1
        return held * blocks.block_size

    async def read_once(self, block_ms: int = READ_BLOCK_MS) -> int:
        """Apply the entries after the last one read (waiting up to block_ms for one); returns how many."""
        reply = await self.redis.xread({self.stream: self.last_id}, block=block_ms, count=1000)
        applied = 0
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_id = _text(entry_id)
                try:
                    self.apply(_text(_field(fields, "worker")),
                               int(_field(fields, "block_size")), _text(_field(fields, "kind")),
                               json.loads(_field(fields, "data")))
                    applied += 1
                except (KeyError, ValueError, TypeError) as exc:
                    logger.warning("skipping a malformed KV event entry %s: %s", self.last_id, exc)
        self.forget_silent_workers()
        return applied

    async def run(self) -> None:
        """Follow the stream until cancelled; on a Redis error, retry every RETRY_S (from where it was)."""
        while True:
            try:
                await self.read_once()
            except (RedisError, OSError) as exc:
                logger.warning("reading KV cache events failed: %s", exc)
                await asyncio.sleep(RETRY_S)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: dict, name: str):
    return fields[name.encode()] if name.encode() in fields else fields[name]


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Stop a publisher's or index's task."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
