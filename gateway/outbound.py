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

A response body is read to its last received byte before a broken connection is reported
(`_DrainingStream`): an upstream that sends its last events and drops the connection must not
lose those events to a gateway that reads them a moment late.

Whole (non-streamed) answers are fetched on the same pool with aiohttp itself (`session()`):
httpx's request and response models were half of such a call's CPU (issue 7).

Each loop's client is closed when that loop is finalized (`_close_at_loop_end`), so no aiohttp
session or connector is left for the garbage collector to report at process exit.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

_LIMITS = httpx.Limits(
    max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS, max_keepalive_connections=100
)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
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


class _DrainingStream(AiohttpResponseStream):
    """httpx-aiohttp's response body, with every byte received handed over before the error.

    When the connection drops, aiohttp stores the error on the body's StreamReader, and every
    public read (`read`, `readany`, `iter_chunked`, even `read_nowait`) raises it before
    looking at the buffer: the bytes received but not yet read, often the upstream's last
    events, were lost whenever the drop was processed before the gateway's next read.
    """

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._aiohttp_response.content
        while True:
            if content.exception() is not None:
                buffered = _buffered(content)
                if buffered:
                    yield buffered
                    continue
            with map_aiohttp_exceptions():
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


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if isinstance(response.stream, AiohttpResponseStream):
            response.stream = _DrainingStream(response.stream._aiohttp_response)
        return response


@dataclass(slots=True)
class _LoopClient:
    """The client of one event loop, and what closes it when that loop ends."""

    http: httpx.AsyncClient
    transport: _Transport  # the client's, whose aiohttp session `session()` hands out
    closer: AsyncGenerator[None, None] | None = None


def _new_client(transport: _Transport) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        # A jar whose policy accepts no domain: httpx stores no reply's cookies.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        timeout=httpx.Timeout(
            settings.GATEWAY_READ_TIMEOUT_SECONDS,
            connect=settings.GATEWAY_CONNECT_TIMEOUT_SECONDS,
        ),
        follow_redirects=False,
        trust_env=False,  # no proxies or .netrc credentials picked up from the environment
    )


async def _close_when_the_loop_ends(
    loop: asyncio.AbstractEventLoop, current: _LoopClient
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        # The entry refers to its loop (aiohttp's session, this generator's finalizer), so the
        # weak key alone would never let it go: a process that runs many loops (asgiref's
        # async_to_sync, one a call) would keep every one of them.
        _clients.pop(loop, None)
        current.closer = None
        await current.http.aclose()


def _close_at_loop_end(loop: asyncio.AbstractEventLoop, current: _LoopClient) -> None:
    """Close `current.http` when its event loop is finalized.

    asyncio has no loop-close hook, but `asyncio.run` (which uvicorn, asgiref's `async_to_sync`
    and the tests use) runs `loop.shutdown_asyncgens()` before closing a loop, which closes
    every async generator the loop saw start, in the loop, while it still runs. Started here
    (its first step awaits nothing), this generator is one of those. Without it aiohttp's
    session and connector were never closed, and were reported unclosed at process exit.
    The generator is kept alive with the client: one collected unfinished would be closed
    at once.
    """
    current.closer = _close_when_the_loop_ends(loop, current)
    try:
        current.closer.asend(None).send(None)
    except StopIteration:
        return  # it reached its `yield`: started and registered with the running loop


def _current() -> _LoopClient:
    loop = asyncio.get_running_loop()
    current = _clients.get(loop)
    if current is None:
        transport = _Transport(limits=_LIMITS, trust_env=False, client=_session)
        current = _clients[loop] = _LoopClient(http=_new_client(transport), transport=transport)
        _close_at_loop_end(loop, current)
    elif current.http.is_closed:
        # The loop's closer closes whichever client is current.
        current.transport = _Transport(limits=_LIMITS, trust_env=False, client=_session)
        current.http = _new_client(current.transport)
    return current


def client() -> httpx.AsyncClient:
    """This event loop's httpx client (streams are read through it)."""
    return _current().http


def session() -> aiohttp.ClientSession:
    """The aiohttp session under this loop's client: the same pool, no cookie jar. Whoever
    uses it passes `allow_redirects=False` and a timeout, as the client does."""
    transport = _current().transport
    if not isinstance(transport.client, aiohttp.ClientSession):
        transport.client = transport.get_client()
    return transport.client
