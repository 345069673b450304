"""The one outbound HTTP client: every call to a provider goes through `client()`.

One pooled `httpx.AsyncClient` per event loop (an async client cannot be shared across loops;
a server process has one loop, tests may have several). Timeouts are explicit and come from
settings; redirects are never followed, so an upstream cannot bounce us elsewhere.
"""

from __future__ import annotations

import asyncio
import socket
import weakref

import httpx
from django.conf import settings

_LIMITS = httpx.Limits(
    max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS, max_keepalive_connections=100
)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is None or existing.is_closed:
        existing = httpx.AsyncClient(
            # httpcore writes a request's headers and body separately; without TCP_NODELAY,
            # Nagle's algorithm holds the body until the provider's delayed ACK (~40 ms).
            transport=httpx.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                limits=_LIMITS,
            ),
            timeout=httpx.Timeout(
                settings.GATEWAY_READ_TIMEOUT_SECONDS,
                connect=settings.GATEWAY_CONNECT_TIMEOUT_SECONDS,
            ),
            follow_redirects=False,
            trust_env=False,  # no proxies or .netrc credentials picked up from the environment
        )
        _clients[loop] = existing
    return existing
