"""Worker registry in Redis: each worker writes its address and load under a key with a TTL on
every heartbeat; a worker that stops heartbeating drops out when its key expires. A heartbeat
rewrites the entry and the role's index whole, so after Redis restarts empty every live worker
is back within one heartbeat."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError

from pdserve.state.redis_retry import RedisWait, url_of

ROLES = ("prefill", "decode", "colocated")


@dataclass
class WorkerLoad:
    """What the router balances on: prefill by queued prompt tokens (those its prefix cache does
    not hold and no chunk has computed yet: the work ahead of a new request), decode by free KV
    blocks and running sequences."""

    queued_prompt_tokens: int = 0
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    cached_blocks: int = 0


@dataclass
class WorkerInfo:
    """One registered worker: its role, gRPC address and (decode) KV transfer endpoint."""

    worker_id: str
    role: str
    address: str
    kv_endpoint: str = ""
    load: WorkerLoad = field(default_factory=WorkerLoad)

    def to_json(self) -> str:
        """Serialised form stored in Redis."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        """Inverse of to_json."""
        data = json.loads(raw)
        data["load"] = WorkerLoad(**data.get("load", {}))
        return cls(**data)


class WorkerRegistry:
    """Register, heartbeat, list and deregister workers (redis.asyncio client).
    wait: how long list() waits for an unreachable Redis before UnavailableError (default 5 s)."""

    def __init__(self, redis, prefix: str = "pdserve", ttl_s: float = 3.0, wait: RedisWait | None = None):
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.wait = wait or RedisWait(url_of(redis))

    def _key(self, role: str, worker_id: str) -> str:
        return f"{self.prefix}:worker:{role}:{worker_id}"

    def _members_key(self, role: str) -> str:
        # An index of the role's worker ids, so listing never scans the keyspace (which holds
        # every request record too); an id whose entry expired is dropped when listed.
        return f"{self.prefix}:workers:{role}"

    async def heartbeat(self, info: WorkerInfo) -> None:
        """Write (or refresh) the worker's entry and its role's index, TTLs included, in one
        transaction; it expires unless refreshed within the TTL. Raises on a Redis error, and
        TimeoutError when Redis does not answer within the TTL (a later beat would be no use)."""
        if info.role not in ROLES:
            raise ValueError(f"unknown worker role {info.role!r}; expected one of {ROLES}")
        await asyncio.wait_for(self._write_entry_twice_if_dropped(info), self.ttl_ms / 1000)

    async def _write_entry_twice_if_dropped(self, info: WorkerInfo) -> None:
        try:
            await self._write_entry(info)
        except RedisConnectionError:
            # A pooled connection that a restarted Redis closed fails once and is dropped; a
            # fresh one re-registers the worker in this beat rather than the next.
            await self._write_entry(info)

    async def _write_entry(self, info: WorkerInfo) -> None:
        members = self._members_key(info.role)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(info.role, info.worker_id), info.to_json(), px=self.ttl_ms)
            pipe.sadd(members, info.worker_id)
            pipe.pexpire(members, self.ttl_ms)
            await pipe.execute()

    async def deregister(self, role: str, worker_id: str) -> None:
        """Remove the worker at once (graceful shutdown)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(role, worker_id))
            pipe.srem(self._members_key(role), worker_id)
            await pipe.execute()

    async def list(self, role: str) -> list[WorkerInfo]:
        """The live workers of one role, sorted by id. Waits for an unreachable Redis up to
        `wait`, then raises UnavailableError."""
        return await self.wait.call(lambda: self._list(role))

    async def _list(self, role: str) -> list[WorkerInfo]:
        ids = sorted(i.decode() if isinstance(i, bytes) else i
                     for i in await self.redis.smembers(self._members_key(role)))
        if not ids:
            return []
        values = await self.redis.mget([self._key(role, i) for i in ids])
        gone = [i for i, v in zip(ids, values) if v is None]
        if gone:
            await self.redis.srem(self._members_key(role), *gone)
        return [WorkerInfo.from_json(v) for v in values if v is not None]
