"""Opening a provider's server-sent event stream, and reading its events, for the adapters that
translate a stream (Anthropic, Gemini).

Failures before the first byte are decided as `post_json` decides them (gateway/providers/
http.py): a refusal is the caller's 400, anything else our 502, retryable when another route
may serve. Failures after it are UpstreamStreamBroken: too late for a status code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from gateway.errors import InvalidRequest, UpstreamFailed, UpstreamStreamBroken
from gateway.outbound import client
from gateway.providers.http import CLIENT_ERRORS, refusal_message, status_failure
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)


async def open_event_stream(
    *,
    route: RouteEntry,
    url: str,
    payload: dict[str, Any],
    headers: Mapping[str, str],
    credential_rejected: Callable[[httpx.Response], bool] | None = None,
) -> httpx.Response:
    """POST `payload` to `url` and return the open response once it answered 200.

    The caller must `aclose()` the response. Raises what `post_json` raises for a non-200.
    """
    outbound = client()
    try:
        response = await outbound.send(
            outbound.build_request("POST", url, json=payload, headers=dict(headers)),
            stream=True,
        )
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
    raise status_failure(route, response.status_code)


async def event_data(route: RouteEntry, response: httpx.Response) -> AsyncIterator[Any]:
    """The JSON `data` of each server-sent event, in order, until the connection ends.

    Event names are not needed: both Anthropic and Gemini repeat the kind inside the data.
    Raises UpstreamStreamBroken when the connection breaks or an event is not JSON.
    """
    data_lines: list[str] = []
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data_lines.append(line[len("data:") :].strip())
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
