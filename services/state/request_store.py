"""Request state in Redis: prompt, resolved sampling parameters and the tokens already sent to
the client, so a request can be resumed elsewhere. Every key carries a TTL, set in the same
atomic step that creates the key.

Keys: `{prefix}:req:{id}` (hash: prompt, params, seed, n, owner, finished:{i}) and
`{prefix}:req:{id}:tokens:{i}` (list: the tokens of sample i sent so far)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pdserve.state.redis_retry import RedisWait, url_of

# Create-if-absent with its TTL in one atomic step: no record ever exists without an expiry.
# ARGV[2] is this call's nonce: a retried create that already went through still answers 1.
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'creator') == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'creator', ARGV[2], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Append progress only onto the record this writer knows. KEYS[1] the hash, KEYS[2 + i] the
# token list of sample i (all samples, so each list's TTL is refreshed with the hash's).
# ARGV[1] TTL; ARGV[2] JSON [[index, offset, [tokens]]...] (offset: the list's length the writer
# expects before its tokens, -1 to skip the check); ARGV[3] JSON [[index, reason]...].
# Returns 0, writing nothing, when the hash is gone (Redis lost it) or a list's length matches
# neither before nor after this write: the caller then rewrites the whole record. A list that
# already holds these tokens (a retried write that had gone through) is left as it is.
_PROGRESS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl = ARGV[1]
local pushes = cjson.decode(ARGV[2])
local todo = {}
for _, p in ipairs(pushes) do
  local key = KEYS[p[1] + 2]
  local have = redis.call('LLEN', key)
  if p[2] < 0 or have == p[2] then
    table.insert(todo, {key, p[3]})
  elseif have ~= p[2] + #p[3] then
    return 0
  end
end
for _, t in ipairs(todo) do
  local tokens = t[2]
  for i = 1, #tokens, 1000 do
    redis.call('RPUSH', t[1], unpack(tokens, i, math.min(i + 999, #tokens)))
  end
end
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
for _, f in ipairs(cjson.decode(ARGV[3])) do
  redis.call('HSET', KEYS[1], 'finished:' .. f[1], f[2])
end
redis.call('EXPIRE', KEYS[1], ttl)
return 1
"""

_PUSH_CHUNK = 1000  # tokens per RPUSH: Lua's unpack and huge commands both have limits


@dataclass
class RequestRecord:
    """What Redis holds for one request. sent_tokens[i] are the tokens of sample i already
    streamed to the client; finished[i] is its finish reason, or None. owner: the identity of
    the client that made it (pdserve.router.identity: a hash, or "" in an open deployment);
    only that identity may resume it."""

    request_id: str
    prompt_token_ids: list[int]
    params: dict
    seed: int
    sent_tokens: list[list[int]]
    finished: list[str | None]
    owner: str = ""


def _record_fields(prompt_token_ids: list[int], params: dict, seed: int, owner: str) -> dict[str, str]:
    return {"prompt": json.dumps(prompt_token_ids), "params": json.dumps(params),
            "seed": str(seed), "n": str(params.get("n", 1)), "owner": owner}


class RequestStore:
    """Create, advance, rewrite and read request records (redis.asyncio client).
    wait: how long create/get wait for an unreachable Redis before UnavailableError
    (default 5 s); progress writes never wait, their caller retries."""

    def __init__(self, redis, prefix: str = "pdserve", ttl_s: int = 3600, wait: RedisWait | None = None):
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.wait = wait or RedisWait(url_of(redis))
        self._create = redis.register_script(_CREATE_SCRIPT)
        self._progress = redis.register_script(_PROGRESS_SCRIPT)

    def _key(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def _tokens_key(self, request_id: str, index: int) -> str:
        return f"{self.prefix}:req:{request_id}:tokens:{index}"

    async def create(self, request_id: str, prompt_token_ids: list[int], params: dict, seed: int,
                     owner: str = "") -> bool:
        """Record a new request made by `owner`; False if one with this id is already recorded.
        Waits for an unreachable Redis up to `wait`, then raises UnavailableError."""
        fields = _record_fields(prompt_token_ids, params, seed, owner)
        flat = [item for pair in fields.items() for item in pair]
        nonce = uuid.uuid4().hex
        return bool(await self.wait.call(
            lambda: self._create(keys=[self._key(request_id)], args=[self.ttl_s, nonce, *flat])))

    async def append_tokens(self, request_id: str, index: int, token_ids: list[int]) -> None:
        """Record tokens of sample `index` as sent to the client."""
        await self.record_progress(request_id, {index: list(token_ids)}, {})

    async def finish(self, request_id: str, index: int, reason: str) -> None:
        """Record sample `index` as finished with `reason`."""
        await self.record_progress(request_id, {}, {index: reason})

    async def record_progress(self, request_id: str, tokens: dict[int, list[int]], finished: dict[int, str],
                              offsets: dict[int, int] | None = None, n: int | None = None) -> bool:
        """In one atomic step: append tokens sent per sample, mark finished samples, refresh TTLs.
        offsets[i]: how many tokens of sample i the caller knows are recorded already (the append
        is skipped if they are there, refused if the list differs); n: the request's sample count
        (refreshes every sample list's TTL). Returns False, having written nothing, when the
        record is gone or differs: the caller should rewrite() it. Raises on a Redis error."""
        count = n if n is not None else max([*tokens, *finished], default=-1) + 1
        bad = [i for i in [*tokens, *finished] if not 0 <= i < count]
        if bad:
            raise ValueError(f"sample index {bad[0]} out of range for a request with n={count}")
        offsets = offsets or {}
        pushes = [[i, offsets.get(i, -1), [int(t) for t in ids]] for i, ids in tokens.items() if ids]
        keys = [self._key(request_id), *(self._tokens_key(request_id, i) for i in range(count))]
        args = [self.ttl_s, json.dumps(pushes), json.dumps([[i, r] for i, r in finished.items()])]
        return bool(await self._progress(keys=keys, args=args))

    async def rewrite(self, record: RequestRecord) -> None:
        """Replace the request's keys with `record`, TTLs included, in one transaction (after
        Redis lost them, or when they diverged). Safe to repeat. Raises on a Redis error."""
        key = self._key(record.request_id)
        token_keys = [self._tokens_key(record.request_id, i) for i in range(len(record.sent_tokens))]
        fields = _record_fields(record.prompt_token_ids, record.params, record.seed, record.owner)
        fields.update({f"finished:{i}": r for i, r in enumerate(record.finished) if r})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key, *token_keys)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl_s)
            for token_key, ids in zip(token_keys, record.sent_tokens):
                for start in range(0, len(ids), _PUSH_CHUNK):
                    pipe.rpush(token_key, *ids[start:start + _PUSH_CHUNK])
                if ids:
                    pipe.expire(token_key, self.ttl_s)
            await pipe.execute()

    async def get(self, request_id: str) -> RequestRecord | None:
        """The record, or None when unknown or expired. Waits for an unreachable Redis up to
        `wait`, then raises UnavailableError."""
        return await self.wait.call(lambda: self._get(request_id))

    async def _get(self, request_id: str) -> RequestRecord | None:
        raw = await self.redis.hgetall(self._key(request_id))
        if not raw or b"prompt" not in raw:
            return None
        n = int(raw[b"n"])
        async with self.redis.pipeline(transaction=True) as pipe:
            for i in range(n):
                pipe.lrange(self._tokens_key(request_id, i), 0, -1)
            lists = await pipe.execute()
        tokens = [[int(t) for t in values] for values in lists]
        finished = [raw.get(f"finished:{i}".encode(), b"").decode() or None for i in range(n)]
        return RequestRecord(request_id, json.loads(raw[b"prompt"]), json.loads(raw[b"params"]),
                             int(raw[b"seed"]), tokens, finished, raw.get(b"owner", b"").decode())

    async def delete(self, request_id: str, n: int = 1) -> None:
        """Drop the record and its token lists."""
        await self.redis.delete(self._key(request_id), *(self._tokens_key(request_id, i) for i in range(n)))
