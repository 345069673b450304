"""Probes for load balancers and orchestrators: `/healthz` and `/readyz`.

`/healthz` answers 200 while the process can run a view (no dependency is touched, so a
database outage does not get every process restarted). `/readyz` answers 200 when the
database, Redis and the Celery broker all answer within READINESS_TIMEOUT_SECONDS, and 503
naming each one that did not otherwise. Neither needs authentication; neither says more
than "ok" or "unreachable" (no hosts, no error text). portal.asgi serves both without the
site's middleware, so a probe's Host header need not be in ALLOWED_HOSTS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse

from portal.redis_clients import async_redis_client

logger = logging.getLogger(__name__)


async def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


async def readyz(request: HttpRequest) -> JsonResponse:
    checks = {
        "database": _database_ready(),
        "redis": _redis_ready(settings.REDIS_URL),
        "broker": _broker_ready(settings.CELERY_BROKER_URL),
    }
    results = await asyncio.gather(*(_within_timeout(name, c) for name, c in checks.items()))
    body = dict(zip(checks, results, strict=True))
    ready = "unreachable" not in results
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", **body}, status=200 if ready else 503
    )


async def _within_timeout(name: str, check: Coroutine[Any, Any, str]) -> str:
    try:
        return await asyncio.wait_for(check, settings.READINESS_TIMEOUT_SECONDS)
    except Exception as exc:
        logger.warning("readiness: %s unreachable: %s", name, type(exc).__name__)
        return "unreachable"


def _select_one() -> None:
    # Closed after (back to the pool, when there is one): this thread is not a request's.
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()


async def _database_ready() -> str:
    await sync_to_async(_select_one, thread_sensitive=False)()
    return "ok"


async def _redis_ping(url: str) -> str:
    client = async_redis_client(url, timeout_seconds=settings.READINESS_TIMEOUT_SECONDS)
    try:
        await client.ping()
    finally:
        await client.aclose()
    return "ok"


async def _redis_ready(url: str) -> str:
    if not url:
        return "not configured"
    return await _redis_ping(url)


async def _broker_ready(url: str) -> str:
    if url.startswith(("redis://", "rediss://")):
        return await _redis_ping(url)
    if url.startswith("filesystem://"):
        # The embedded broker: a folder the worker and this process share.
        folder = Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]))
        if not await asyncio.to_thread(folder.is_dir):
            raise FileNotFoundError("the broker folder is missing")
        return "ok"
    return "not checked"
