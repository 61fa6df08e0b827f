"""Request state in Redis: prompt, resolved sampling parameters and the tokens already sent to
the client, so a request can be resumed elsewhere. Every key carries a TTL."""

from __future__ import annotations

import json
from dataclasses import dataclass


# Create-if-absent with its TTL in one atomic step: no record ever exists without an expiry.
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass
class RequestRecord:
    """What Redis holds for one request. sent_tokens[i] are the tokens of sample i already
    streamed to the client; finished[i] is its finish reason, or None."""

    request_id: str
    prompt_token_ids: list[int]
    params: dict
    seed: int
    sent_tokens: list[list[int]]
    finished: list[str | None]


class RequestStore:
    """Create, advance and read request records (redis.asyncio client)."""

    def __init__(self, redis, prefix: str = "pdserve", ttl_s: int = 3600):
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def _tokens_key(self, request_id: str, index: int) -> str:
        return f"{self.prefix}:req:{request_id}:tokens:{index}"

    async def create(self, request_id: str, prompt_token_ids: list[int], params: dict, seed: int) -> bool:
        """Record a new request; False if one with this id is already recorded."""
        key = self._key(request_id)
        fields = {"prompt": json.dumps(prompt_token_ids), "params": json.dumps(params),
                  "seed": str(seed), "n": str(params.get("n", 1))}
        flat = [item for pair in fields.items() for item in pair]
        return bool(await self.redis.eval(_CREATE_SCRIPT, 1, key, self.ttl_s, *flat))

    async def append_tokens(self, request_id: str, index: int, token_ids: list[int]) -> None:
        """Record tokens of sample `index` as sent to the client."""
        await self.record_progress(request_id, {index: list(token_ids)}, {})

    async def finish(self, request_id: str, index: int, reason: str) -> None:
        """Record sample `index` as finished with `reason`."""
        await self.record_progress(request_id, {}, {index: reason})

    async def record_progress(self, request_id: str, tokens: dict[int, list[int]],
                              finished: dict[int, str]) -> None:
        """In one round trip: append tokens sent per sample, mark finished samples, refresh TTLs."""
        key = self._key(request_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            for index, token_ids in tokens.items():
                if token_ids:
                    pipe.rpush(self._tokens_key(request_id, index), *token_ids)
                    pipe.expire(self._tokens_key(request_id, index), self.ttl_s)
            for index, reason in finished.items():
                pipe.hset(key, f"finished:{index}", reason)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def get(self, request_id: str) -> RequestRecord | None:
        """The record, or None when unknown or expired."""
        raw = await self.redis.hgetall(self._key(request_id))
        if not raw or b"prompt" not in raw:
            return None
        n = int(raw[b"n"])
        tokens = []
        for i in range(n):
            tokens.append([int(t) for t in await self.redis.lrange(self._tokens_key(request_id, i), 0, -1)])
        finished = [raw.get(f"finished:{i}".encode(), b"").decode() or None for i in range(n)]
        return RequestRecord(request_id, json.loads(raw[b"prompt"]), json.loads(raw[b"params"]),
                             int(raw[b"seed"]), tokens, finished)

    async def delete(self, request_id: str, n: int = 1) -> None:
        """Drop the record and its token lists."""
        await self.redis.delete(self._key(request_id), *(self._tokens_key(request_id, i) for i in range(n)))
