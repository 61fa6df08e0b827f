"""Opening Redis for the pdserve processes: redis:// or rediss:// (TLS) URLs, AUTH/ACL from the
URL's user:password, a CA bundle for rediss, and a start-up check whose errors name the URL
without its password.

URL forms: redis://[[user]:password@]host:port/db, rediss://... (TLS; --redis-ca or the
system's roots verify the server; redis-py's ssl_* query parameters such as ssl_certfile,
ssl_keyfile and ssl_cert_reqs work too), unix:///path.sock?password=...
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError


class RedisSetupError(ValueError):
    """Redis refused this process's credentials or TLS, or could not be reached at start (a
    ValueError, so that `pdserve` reports it as one line, like other configuration errors)."""


REDIS_TIMEOUT_S = 5.0


def redact_url(url: str) -> str:
    """`url` with its password (and any password= query parameter) replaced by '***'."""
    netloc = urlsplit(url).netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        url = url.replace(netloc, f"{userinfo.partition(':')[0]}:***@{host}", 1)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def url_has_secret(url: str) -> bool:
    """Whether `url` carries a password (so it should not go on a command line)."""
    parts = urlsplit(url)
    return parts.password is not None or "password=" in parts.query


def open_redis(url: str, ca_file: str | None = None) -> aioredis.Redis:
    """An asyncio Redis client for `url` (no I/O yet); ca_file verifies a rediss:// server."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisSetupError(f"--redis-url {redact_url(url)}: the scheme must be redis://, rediss:// or unix://")
    if ca_file and scheme != "rediss":
        raise RedisSetupError(f"--redis-ca is set but --redis-url {redact_url(url)} is not a rediss:// URL")
    kwargs = {"ssl_ca_certs": ca_file} if ca_file else {}
    # Bounded waits: a hung or partitioned Redis fails a call after these, it never blocks one forever.
    return aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                             **kwargs)


async def check_redis(client: aioredis.Redis, url: str, require_reachable: bool = True,
                      timeout_s: float = 10.0) -> None:
    """PING once at start. Wrong credentials (or a rejected AUTH) raise RedisSetupError naming the
    redacted URL; an unreachable server (no answer within timeout_s, or a TLS failure) raises it
    too unless require_reachable is False (a worker keeps starting and its heartbeats retry)."""
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except (AuthenticationError, ResponseError) as exc:
        raise RedisSetupError(f"Redis at {redact_url(url)} refused this process's credentials ({exc}); "
                              "check the user:password in --redis-url / PDSERVE_REDIS_URL") from None
    except (TimeoutError, RedisConnectionError, OSError) as exc:
        if require_reachable:
            raise RedisSetupError(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
