"""Step 3 of the request path: per-key rate limits, shared by every gateway process.

- requests per minute and tokens per minute: a sliding window of 60 one-second buckets;
  a request is admitted while the last 60 seconds hold fewer than the limit (for tokens, the
  request's actual tokens are added when it settles, so a key may overshoot its TPM by one
  request's worth, never more);
- concurrent requests: a set of in-flight request ids; entries older than the reservation
  sweep bound are dropped, so a crashed process cannot leak capacity for ever.

With REDIS_URL set, the state lives in Redis and each check is one atomic Lua script; without
it, in this process's memory (correct only for the single-process embedded mode). Keys with no
rate limits never touch Redis. If Redis is unreachable, limited keys are refused with 503
(failing closed): limits are not money, but an operator who set them wants them held. Money
is never at stake here: credit and spend caps are enforced in the database.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from gateway.errors import RateLimited, ServiceUnavailable
from portal.redis_clients import async_redis_client

WINDOW_SECONDS = 60

# KEYS[1] the bucket hash; ARGV: now (whole seconds), limit (-1: none, only count), amount
# to add if admitted.
# Returns {admitted (0/1), seconds until the oldest counted bucket leaves the window}.
_WINDOW_SCRIPT = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local buckets = redis.call('HGETALL', KEYS[1])
local used, oldest = 0, now
for i = 1, #buckets, 2 do
  local second = tonumber(buckets[i])
  if second <= now - 60 then
    redis.call('HDEL', KEYS[1], buckets[i])
  else
    used = used + tonumber(buckets[i + 1])
    if second < oldest then oldest = second end
  end
end
if limit >= 0 and used >= limit then
  return {0, oldest + 60 - now}
end
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], amount)
  redis.call('EXPIRE', KEYS[1], 61)
end
return {1, 0}
"""

# KEYS[1] the in-flight set; ARGV: now (seconds, float), limit, request id, entry lifetime.
_CONCURRENCY_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[4]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


@dataclass(frozen=True, slots=True)
class RateLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def any(self) -> bool:
        return any(
            limit is not None
            for limit in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.max_concurrent_requests,
            )
        )


class _LocalState:
    """The embedded mode's limiter state: one event loop, so check-and-add cannot interleave."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[int, int]] = {}
        self.in_flight: dict[str, dict[str, float]] = {}

    def window(self, key: str, now: int, limit: int | None, amount: int) -> tuple[bool, int]:
        buckets = self.windows.setdefault(key, {})
        for second in [s for s in buckets if s <= now - WINDOW_SECONDS]:
            del buckets[second]
        if limit is not None and sum(buckets.values()) >= limit:
            return False, min(buckets) + WINDOW_SECONDS - now
        if amount:
            buckets[now] = buckets.get(now, 0) + amount
        return True, 0

    def enter(self, key: str, now: float, limit: int, request_id: str, lifetime: int) -> bool:
        flights = self.in_flight.setdefault(key, {})
        for stale in [r for r, started in flights.items() if started <= now - lifetime]:
            del flights[stale]
        if len(flights) >= limit:
            return False
        flights[request_id] = now
        return True


NO_LIMITS = RateLimits()
_local = _LocalState()
# One client (and its connection pool) per event loop and Redis URL.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def _redis() -> aioredis.Redis | None:
    url = settings.REDIS_URL
    if not url:
        return None
    per_url = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_url.get(url)
    if client is None:
        # Short timeouts and one retry (portal/redis_clients.py): while Redis is down a limited
        # key is answered 503 at once, and served again as soon as Redis is back.
        client = per_url[url] = async_redis_client(url)
    return client


def _prefix(api_key_id: int) -> str:
    return f"sb:limits:{api_key_id}"


async def _window(key: str, limit: int | None, amount: int) -> tuple[bool, int]:
    """Admit (adding `amount`) while the last minute holds less than `limit` (None: always);
    returns whether admitted and, if not, the seconds until it could be."""
    now = int(time.time())
    client = _redis()
    if client is None:
        return _local.window(key, now, limit, amount)
    admitted, retry_after = await client.eval(
        _WINDOW_SCRIPT, 1, key, now, -1 if limit is None else limit, amount
    )
    return bool(admitted), int(retry_after)


async def _enter(key: str, limit: int, request_id: str) -> bool:
    """Add the request to the in-flight set unless it already holds `limit` requests."""
    lifetime = settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS
    now = time.time()
    client = _redis()
    if client is None:
        return _local.enter(key, now, limit, request_id, lifetime)
    return bool(await client.eval(_CONCURRENCY_SCRIPT, 1, key, now, limit, request_id, lifetime))


async def _leave(key: str, request_id: str) -> None:
    client = _redis()
    if client is None:
        _local.in_flight.get(key, {}).pop(request_id, None)
    else:
        await client.zrem(key, request_id)


async def limits_admit(*, api_key_id: int, request_id: str, limits: RateLimits) -> None:
    """Admit a request under its key's limits, or raise RateLimited (429, with Retry-After).

    A request admitted here must be followed by `limits_release` when it ends.
    """
    if not limits.any:
        return
    prefix = _prefix(api_key_id)
    try:
        if limits.tokens_per_minute is not None:
            admitted, retry_after = await _window(f"{prefix}:tpm", limits.tokens_per_minute, 0)
            if not admitted:
                raise RateLimited(
                    f"This key's limit of {limits.tokens_per_minute} tokens per minute is reached.",
                    retry_after_seconds=retry_after,
                )
        if limits.requests_per_minute is not None:
            admitted, retry_after = await _window(f"{prefix}:rpm", limits.requests_per_minute, 1)
            if not admitted:
                raise RateLimited(
                    f"This key's limit of {limits.requests_per_minute} requests per minute is "
                    "reached.",
                    retry_after_seconds=retry_after,
                )
        concurrency = limits.max_concurrent_requests
        if concurrency is not None and not await _enter(
            f"{prefix}:inflight", concurrency, request_id
        ):
            raise RateLimited(
                f"This key's limit of {concurrency} concurrent requests is reached.",
                retry_after_seconds=1,
            )
    except RedisError:
        raise ServiceUnavailable(
            "The rate limiter is unavailable; this key's limits cannot be checked."
        ) from None


async def limits_release(
    *, api_key_id: int, request_id: str, limits: RateLimits, tokens: int
) -> None:
    """End an admitted request: free its concurrency slot and count its tokens for TPM."""
    if not limits.any:
        return
    prefix = _prefix(api_key_id)
    try:
        if limits.max_concurrent_requests is not None:
            await _leave(f"{prefix}:inflight", request_id)
        if limits.tokens_per_minute is not None and tokens > 0:
            await _window(f"{prefix}:tpm", None, tokens)  # counted, never refused
    except RedisError:
        # Not fatal: the slot expires with the sweep bound and TPM under-counts one request.
        pass
