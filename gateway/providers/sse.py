"""Opening a provider's server-sent event stream, and reading its events: the one way every
adapter (OpenAI-style, Anthropic, Gemini) starts a stream.

Failures before the first byte are decided as `post_json` decides them (gateway/providers/
http.py): a refusal is the caller's 400, anything else our 502, retryable when another route
may serve, with the provider's `Retry-After`. The route's own timeouts apply: connect, and the
first byte. Failures after it are UpstreamStreamBroken: too late for a status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from gateway.errors import InvalidRequest, UpstreamFailed, UpstreamStreamBroken
from gateway.outbound import client
from gateway.providers.http import CLIENT_ERRORS, refusal_message, route_timeout, status_failure
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)

# What an OpenAI-style stream sends as its last `data:`; Anthropic and Gemini send no such line.
_END_OF_STREAM = "[DONE]"


async def open_event_stream(
    *,
    route: RouteEntry,
    url: str,
    payload: dict[str, Any],
    headers: Mapping[str, str],
    credential_rejected: Callable[[httpx.Response], bool] | None = None,
) -> httpx.Response:
    """POST `payload` to `url` and return the open response once it answered 200, its events
    unread, within the route's first-byte timeout.

    The caller must `aclose()` the response. Raises what `post_json` raises for a non-200, and
    a retryable UpstreamFailed when the first byte did not come in time.
    """
    outbound = client()
    try:
        # Each read of the body may wait a little over the idle timeout (the relay's own check,
        # gateway/streaming.py `paced`, is the one that ends a silent stream); the wait for the
        # first byte is bounded here, whatever the transport does with read timeouts.
        # asyncio.timeout, not wait_for: wait_for opens the stream in a task of its own, and
        # streams opened that way lost their relayed chunks when cut midway (test_streaming.py).
        async with asyncio.timeout(route.first_byte_timeout_seconds):
            response = await outbound.send(
                outbound.build_request(
                    "POST",
                    url,
                    json=payload,
                    headers=dict(headers),
                    timeout=route_timeout(route, read_seconds=route.idle_timeout_seconds + 1),
                ),
                stream=True,
            )
    except TimeoutError:
        logger.warning("provider %s: no first byte in time", route.provider)
        raise UpstreamFailed("The provider did not answer in time.", retryable=True) from None
    except httpx.HTTPError as exc:
        logger.warning("provider %s unreachable: %s", route.provider, type(exc).__name__)
        raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
    if response.status_code == 200:
        return response
    try:
        await response.aread()  # the refusal's explanation, for a 4xx
    except httpx.HTTPError:
        raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
    finally:
        await response.aclose()
    if response.status_code in CLIENT_ERRORS and not (
        credential_rejected is not None and credential_rejected(response)
    ):
        raise InvalidRequest(refusal_message(response))
    raise status_failure(route, response.status_code, response=response)


async def event_data(route: RouteEntry, response: httpx.Response) -> AsyncIterator[Any]:
    """The JSON `data` of each server-sent event, in order, until the connection ends or an
    OpenAI-style `data: [DONE]`.

    Event names are not needed: Anthropic and Gemini repeat the kind inside the data, OpenAI
    sends none. Raises UpstreamStreamBroken when the connection breaks or an event is not JSON.
    """
    data_lines: list[str] = []
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = line[len("data:") :].strip()
                if data == _END_OF_STREAM and not data_lines:
                    return
                data_lines.append(data)
            elif not line and data_lines:  # a blank line ends an event
                yield _parsed("\n".join(data_lines))
                data_lines = []
            # `event:`, `id:`, comments (": keep-alive"): nothing to read
    except httpx.HTTPError as exc:
        logger.warning("provider %s stream broke: %s", route.provider, type(exc).__name__)
        raise UpstreamStreamBroken("The provider's stream broke off.") from None
    if data_lines:
        yield _parsed("\n".join(data_lines))


def _parsed(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise UpstreamStreamBroken("The provider's stream was not readable.") from None
