"""Every Redis client of the project, made with the same short timeouts and one retry.

REDIS_CONNECT_TIMEOUT_SECONDS and REDIS_READ_TIMEOUT_SECONDS bound each attempt; one
immediate retry replaces a pooled connection that a Redis restart closed. redis-py's own
default (ten retries with backoff) held requests for seconds while Redis was down; a caller
here gets a RedisError quickly and answers for itself (the gateway: 503).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

_sync_clients: dict[str, redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    """This process's client for `url` (thread-safe: its pool hands each thread a connection)."""
    client = _sync_clients.get(url)
    if client is None:
        client = _sync_clients[url] = redis.Redis.from_url(
            url,
            socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
            socket_timeout=settings.REDIS_READ_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 1),
        )
    return client


def async_redis_client(url: str, *, timeout_seconds: float | None = None) -> aioredis.Redis:
    """A new asyncio client for `url` (the caller keeps one per event loop); `timeout_seconds`
    overrides both timeouts."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_seconds or settings.REDIS_CONNECT_TIMEOUT_SECONDS,
        socket_timeout=timeout_seconds or settings.REDIS_READ_TIMEOUT_SECONDS,
        retry=AsyncRetry(NoBackoff(), 1),
    )
