"""The one outbound HTTP client: every call to a provider goes through `session()`.

One pooled aiohttp session per event loop (a session cannot be shared across loops; a server
process has one loop, tests may have several). Whoever uses it passes explicit timeouts (the
route's, gateway/providers/http.py and sse.py) and `allow_redirects=False`, so an upstream
cannot bounce us elsewhere. The session reads no proxy or .netrc settings from the environment
(`trust_env=False`), and verifies certificates against certifi's store, as httpx did.

aiohttp is used directly, for whole answers and streams alike: httpx's own transport (httpcore
on anyio) cost several times more CPU per request, and even over aiohttp's transport httpx's
request and response models were about half of an upstream call's CPU (issue 7;
bench/RESULTS.md has the figures). aiohttp sets TCP_NODELAY on every connection.

The session keeps no cookies: it is shared by every organisation's requests, so a cookie one
upstream reply set would otherwise ride along on the next customer's call to that provider.

A response body is read to its last received byte before a broken connection is reported
(`body_chunks`): an upstream that sends its last events and drops the connection must not
lose those events to a gateway that reads them a moment late.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import httpx
from django.conf import settings

from portal.event_loops import loop_resource


@dataclass(frozen=True, slots=True)
class _PoolLimits:
    max_connections: int  # open connections to all upstreams together, per process
    keepalive_expiry: float  # seconds an idle connection is kept for the next call


_LIMITS = _PoolLimits(
    max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS, keepalive_expiry=5.0
)


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=_LIMITS.max_connections,
            keepalive_timeout=_LIMITS.keepalive_expiry,
            ssl=httpx.create_ssl_context(trust_env=False),  # certifi's store
        ),
        cookie_jar=aiohttp.DummyCookieJar(),  # stores nothing, sends nothing
        trust_env=False,  # no proxies or .netrc credentials picked up from the environment
    )


@dataclass(slots=True)
class _LoopSession:
    """The session of one event loop (replaced if something closed it)."""

    http: aiohttp.ClientSession


async def _close(current: _LoopSession) -> None:
    await current.http.close()


def session() -> aiohttp.ClientSession:
    """This event loop's aiohttp session: one pool, no cookie jar. Whoever uses it passes
    `allow_redirects=False` and the route's timeout. Closed when the loop ends
    (portal/event_loops.py), so no session or connector is left for the garbage collector to
    report at process exit."""
    current = loop_resource(_LoopSession, lambda: _LoopSession(http=_new_session()), _close)
    if current.http.closed:
        current.http = _new_session()  # the loop's closer closes whichever session is current
    return current.http


async def body_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """`response`'s body as it arrives, every byte received handed over before an error.

    When the connection drops, aiohttp stores the error on the body's StreamReader, and every
    public read (`read`, `readany`, `iter_chunked`, even `read_nowait`) raises it before
    looking at the buffer: the bytes received but not yet read, often the upstream's last
    events, were lost whenever the drop was processed before the gateway's next read.
    Raises aiohttp.ClientError (or TimeoutError) once the buffer is empty.
    """
    content = response.content
    while True:
        if content.exception() is not None:
            buffered = _buffered(content)
            if buffered:
                yield buffered
                continue
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """What `content` holds unread, without raising its stored error (private aiohttp API:
    tests/gateway/test_outbound.py fails if a new aiohttp changes it)."""
    if not content._buffer:
        return b""
    return content._read_nowait(-1)
