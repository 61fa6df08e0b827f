"""A request whose client leaves while the router waits on Redis is cancelled at once: redis-py's
asyncio client can swallow a cancellation that lands mid-command (about one in three, measured
with redis 8.2), so RedisWait runs each command in a task of its own behind a shield. Real Redis
(the embedded server), real client."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis

from pdserve.state.embedded_redis import EmbeddedRedis
from pdserve.state.redis_retry import RedisWait

CANCELS = 200


def test_a_cancel_mid_command_always_reaches_the_caller():
    server = EmbeddedRedis().start()

    async def scenario() -> int:
        client = aioredis.from_url(server.url)
        wait = RedisWait(server.url)
        rng = random.Random(0)
        kept_running = 0
        try:
            for _ in range(CANCELS):
                async def request():  # a request that keeps talking to Redis until it is cancelled
                    while True:
                        await wait.call(lambda: client.set("k", "v" * 100))
                        await wait.call(lambda: client.get("k"))

                task = asyncio.ensure_future(request())
                await asyncio.sleep(rng.uniform(0, 0.01))
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if not done or not task.cancelled():
                    kept_running += 1
                    task.cancel()
                    await asyncio.wait({task}, timeout=1.0)
            assert await client.get("k") == b"v" * 100  # the connections still work
        finally:
            await client.aclose()
        return kept_running

    try:
        assert asyncio.run(scenario()) == 0
    finally:
        server.stop()
