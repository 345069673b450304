"""Opening a provider's server-sent event stream, and reading its events: the one way every
adapter (OpenAI-style, Anthropic, Gemini) starts a stream.

The stream is opened on the shared aiohttp session (gateway/outbound.py: one pool, no cookie
jar, no redirects), as whole answers are (gateway/providers/http.py): httpx's request and
response models, its line decoder and its transport shim were most of a stream frame's
upstream CPU (issue 7, bench/RESULTS.md).

Failures before the first byte are decided as `post_json` decides them: a refusal is the
caller's 400, anything else our 502, retryable when another route may serve, with the
provider's `Retry-After`. The route's own timeouts apply: connect, and the first byte. Failures
after it are UpstreamStreamBroken: too late for a status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import httpx
from multidict import CIMultiDict

from gateway import outbound
from gateway.errors import InvalidRequest, UpstreamFailed, UpstreamStreamBroken
from gateway.providers.http import CLIENT_ERRORS, refusal_message, route_timeout, status_failure
from gateway.selectors import RouteEntry
from gateway.wire import json_bytes

logger = logging.getLogger(__name__)

# What an OpenAI-style stream sends as its last `data:`; Anthropic and Gemini send no such line.
_END_OF_STREAM = b"[DONE]"


async def open_event_stream(
    *,
    route: RouteEntry,
    url: str,
    payload: dict[str, Any],
    headers: Mapping[str, str],
    credential_rejected: Callable[[httpx.Response], bool] | None = None,
) -> aiohttp.ClientResponse:
    """POST `payload` to `url` and return the open response once it answered 200, its events
    unread, within the route's first-byte timeout.

    The caller must close it (`closer(response)`). Raises what `post_json` raises for a
    non-200, and a retryable UpstreamFailed when the first byte did not come in time.
    """
    body = json_bytes(payload)
    outgoing = CIMultiDict(headers)
    outgoing.setdefault("Content-Type", "application/json")
    # Each read of the body may wait a little over the idle timeout (the relay's own check,
    # gateway/streaming.py `paced`, is the one that ends a silent stream); the wait for the
    # first byte is bounded here, whatever aiohttp does with read timeouts.
    timeout = route_timeout(route, read_seconds=route.idle_timeout_seconds + 1)
    try:
        # asyncio.timeout, not wait_for: wait_for opens the stream in a task of its own, and
        # streams opened that way lost their relayed chunks when cut midway (test_streaming.py).
        async with asyncio.timeout(route.first_byte_timeout_seconds):
            response = await outbound.session().post(
                url,
                data=body,
                headers=outgoing,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
                ),
            )
    except aiohttp.ClientError as exc:  # connect timeouts included
        logger.warning("provider %s unreachable: %s", route.provider, type(exc).__name__)
        raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
    except TimeoutError:
        logger.warning("provider %s: no first byte in time", route.provider)
        raise UpstreamFailed("The provider did not answer in time.", retryable=True) from None
    if response.status == 200:
        return response
    try:
        raw = await response.read()  # the refusal's explanation, for a 4xx
    except (aiohttp.ClientError, TimeoutError):
        raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
    finally:
        response.release()
    refusal = httpx.Response(response.status, headers=list(response.raw_headers), content=raw)
    if response.status in CLIENT_ERRORS and not (
        credential_rejected is not None and credential_rejected(refusal)
    ):
        raise InvalidRequest(refusal_message(refusal))
    raise status_failure(route, response.status, response=refusal)


def closer(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    """What closes an open stream however it ended: a body read to its end gives its
    connection back to the pool, one left midway (the client went away) closes it."""

    async def close() -> None:
        response.release()

    return close


class EventObject(dict[str, Any]):
    """A JSON object an upstream sent as one event's data, and those bytes, on one line: a
    relay that changes nothing in it may send the bytes on as they came instead of encoding
    the object again (gateway/streaming.py). Whoever changes the object sets `raw` to None."""

    __slots__ = ("raw",)

    def __init__(self, parsed: dict[str, Any], raw: bytes | None) -> None:
        super().__init__(parsed)
        self.raw = raw


async def event_data(
    route: RouteEntry, response: aiohttp.ClientResponse, *, keep_bytes: bool = False
) -> AsyncIterator[Any]:
    """The JSON `data` of each server-sent event, in order, until the connection ends or an
    OpenAI-style `data: [DONE]`; with `keep_bytes`, each object as an EventObject.

    Event names are not needed: Anthropic and Gemini repeat the kind inside the data, OpenAI
    sends none. Raises UpstreamStreamBroken when the connection breaks or an event is not JSON.
    """
    pending = b""  # the start of an event whose blank line has not arrived yet
    try:
        async for received in outbound.body_chunks(response):
            if pending:
                received = pending + received
            if b"\r" in received:
                # CRLF line ends; a CR at the very end stays pending until its LF comes.
                received = received.replace(b"\r\n", b"\n")
            events = received.split(b"\n\n")  # a blank line ends an event
            pending = events.pop()
            for event in events:
                data = _data_of(event)
                if data is None:
                    continue  # `event:`, `id:` or comments (": keep-alive") only
                if data == _END_OF_STREAM:
                    return
                yield _parsed(data, keep_bytes)
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.warning("provider %s stream broke: %s", route.provider, type(exc).__name__)
        raise UpstreamStreamBroken("The provider's stream broke off.") from None
    data = _data_of(pending.strip(b"\r\n"))  # a last event without its blank line
    if data is not None and data != _END_OF_STREAM:
        yield _parsed(data, keep_bytes)


def _data_of(event: bytes) -> bytes | None:
    """The `data` of one event (its `data:` lines joined by newlines), or None without one."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:].strip()  # the usual event: one data line, nothing else
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _parsed(data: bytes, keep_bytes: bool) -> Any:
    try:
        parsed = json.loads(data.decode())  # SSE is UTF-8: json's encoding sniffing is waste
    except (ValueError, RecursionError):  # RecursionError: nested past the reader's depth
        raise UpstreamStreamBroken("The provider's stream was not readable.") from None
    if keep_bytes and type(parsed) is dict:
        # Data joined from several `data:` lines holds a newline, and a lone CR ends an SSE
        # line too: such bytes are not sendable as one `data:` line.
        one_line = b"\n" not in data and b"\r" not in data
        return EventObject(parsed, data if one_line else None)
    return parsed
