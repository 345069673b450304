"""The one outbound HTTP client: every call to a provider goes through `client()`.

One pooled `httpx.AsyncClient` per event loop (an async client cannot be shared across loops;
a server process has one loop, tests may have several). Timeouts are explicit and come from
settings; redirects are never followed, so an upstream cannot bounce us elsewhere.

The client keeps httpx's API but sends through aiohttp (httpx-aiohttp's transport): httpx's own
transport (httpcore on anyio) costs several times more CPU per request, and under concurrency
its pool became the gateway's bottleneck (issue 7; bench/RESULTS.md has the figures). aiohttp
sets TCP_NODELAY on every connection, and its errors are raised as httpx's.

The client keeps no cookies: it is shared by every organisation's requests, so a cookie one
upstream reply set would otherwise ride along on the next customer's call to that provider.
Neither httpx's jar nor aiohttp's stores anything.
"""

from __future__ import annotations

import asyncio
import weakref
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport

_LIMITS = httpx.Limits(
    max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS, max_keepalive_connections=100
)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def _session() -> aiohttp.ClientSession:
    """aiohttp's session as httpx-aiohttp would build it, without a cookie jar."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=_LIMITS.max_connections or 0,
            keepalive_timeout=_LIMITS.keepalive_expiry,
            ssl=httpx.create_ssl_context(trust_env=False),
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is None or existing.is_closed:
        existing = httpx.AsyncClient(
            transport=AiohttpTransport(limits=_LIMITS, trust_env=False, client=_session),
            # A jar whose policy accepts no domain: httpx stores no reply's cookies.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            timeout=httpx.Timeout(
                settings.GATEWAY_READ_TIMEOUT_SECONDS,
                connect=settings.GATEWAY_CONNECT_TIMEOUT_SECONDS,
            ),
            follow_redirects=False,
            trust_env=False,  # no proxies or .netrc credentials picked up from the environment
        )
        _clients[loop] = existing
    return existing
