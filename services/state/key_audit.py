"""Audits of what pdserve leaves in Redis: every key it writes must carry a TTL, so nothing
outlives a crashed server or an abandoned request."""

from __future__ import annotations


async def keys_without_ttl(redis, prefix: str, batch: int = 500) -> list[str]:
    """The keys under `prefix` (`prefix:*`, and `prefix` itself) that have no expiry, sorted.
    SCAN (never KEYS, so Redis is not blocked) and TTL in pipelined batches; a key that
    vanishes between the two is not counted. `redis` is a redis.asyncio client."""
    found: list[str] = []
    pending: list[bytes | str] = []

    async def check() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for key in pending:
                pipe.ttl(key)
            ttls = await pipe.execute()
        found.extend(_text(k) for k, ttl in zip(pending, ttls) if ttl == -1)  # -2: gone meanwhile
        pending.clear()

    if await redis.exists(prefix):
        pending.append(prefix)
    async for key in redis.scan_iter(match=f"{_escape_glob(prefix)}:*", count=batch):
        pending.append(key)
        if len(pending) >= batch:
            await check()
    if pending:
        await check()
    return sorted(found)


def _text(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key


def _escape_glob(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
