"""The one way an adapter calls its provider: POST JSON, and turn every failure into a gateway
error the caller may see.

What the caller learns is decided here, once for every provider: a request the provider refused
as invalid comes back as a 400 with the provider's own explanation (the caller can fix it);
anything else (unreachable, 5xx, a rejected credential, an unreadable answer) is our failure and
comes back as a 502 that names only the HTTP status. Neither the provider's URL nor its secret
ever reaches a message or a log line: the log names the provider by its catalog name.

A whole (non-streamed) answer is fetched with aiohttp, on the loop's one session
(gateway/outbound.py: one pool, no cookie jar, no redirects), as streams are
(gateway/providers/sse.py): building httpx's request and response models around each call was
about half of the upstream call's CPU in the gateway's profile (issue 7, bench/RESULTS.md).
Failures still reach the helpers below as an httpx response, built only for them, and
`route_timeout` is written in httpx's terms (`_aiohttp_timeout` maps it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import httpx
from multidict import CIMultiDict

from gateway import outbound
from gateway.errors import InvalidRequest, UnreadableAnswer, UpstreamFailed
from gateway.selectors import RouteEntry
from gateway.wire import json_bytes

logger = logging.getLogger(__name__)

# Upstream statuses that mean the request itself was refused; everything else is our failure.
CLIENT_ERRORS = frozenset({400, 404, 413, 422})


def refusal_message(response: httpx.Response) -> str:
    """The provider's explanation of why it refused a request, for the caller.

    OpenAI, Anthropic and Gemini all put it at `error.message` in their error bodies.
    """
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"The provider refused the request (HTTP {response.status_code})."
    return f"The provider refused the request: {str(message)[:500]}"


def status_failure(
    route: RouteEntry, status: int, *, response: httpx.Response | None = None
) -> UpstreamFailed:
    """The failure for a provider's non-200, non-refusal answer; 5xx and 429 may fail over,
    and a 429 or 503 carries the `Retry-After` the provider asked for (given the response)."""
    logger.warning("provider %s answered HTTP %s", route.provider, status)
    return UpstreamFailed(
        f"The provider failed (HTTP {status}).",
        retryable=status >= 500 or status == 429,
        retry_after_seconds=(
            retry_after_seconds(response) if response is not None and status in (429, 503) else None
        ),
    )


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The wait a `Retry-After` header asks for, in seconds (delay-seconds or an HTTP date)."""
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def route_timeout(route: RouteEntry, *, read_seconds: float | None = None) -> httpx.Timeout:
    """The route's timeouts for one request: connect, and each read (by default the wait for
    the answer's first byte; a stream's idle gap is bounded by the relay)."""
    return httpx.Timeout(
        route.first_byte_timeout_seconds if read_seconds is None else read_seconds,
        connect=route.connect_timeout_seconds,
        pool=route.connect_timeout_seconds,
    )


async def post_json(
    *,
    route: RouteEntry,
    url: str,
    payload: dict[str, Any],
    headers: Mapping[str, str],
    credential_rejected: Callable[[httpx.Response], bool] | None = None,
) -> Any:
    """POST `payload` to `url` and return the parsed JSON of a 200 answer.

    Raises InvalidRequest when the provider refused the request as invalid (400, 404, 413,
    422), and UpstreamFailed otherwise: unreachable, any other status, or an answer that is not
    JSON (UnreadableAnswer, which fails over). `credential_rejected` picks out the refusals
    that are really about our credential (a provider that answers a bad key with 400): those
    are our failure, not the caller's.
    """
    body = json_bytes(payload)
    outgoing = CIMultiDict(headers)
    outgoing.setdefault("Content-Type", "application/json")
    try:
        async with outbound.session().post(
            url,
            data=body,
            headers=outgoing,
            allow_redirects=False,
            timeout=_aiohttp_timeout(route),
        ) as reply:
            status = reply.status
            raw = await reply.read()
            raw_headers = reply.raw_headers
    except (TimeoutError, aiohttp.ClientError) as exc:
        logger.warning("provider %s unreachable: %s", route.provider, type(exc).__name__)
        raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
    if status != 200:
        response = httpx.Response(status, headers=list(raw_headers), content=raw)
        if status in CLIENT_ERRORS and not (
            credential_rejected is not None and credential_rejected(response)
        ):
            raise InvalidRequest(refusal_message(response))
        raise status_failure(route, status, response=response)
    try:
        # Python's json, not orjson: lenient with what a provider sends (a lone surrogate's
        # escape, which an answer split mid-character can hold, passes through as it came).
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested past the reader's depth
        logger.warning("provider %s answered what is not JSON", route.provider)
        raise UnreadableAnswer("The provider's answer was not valid JSON.") from None


def _aiohttp_timeout(route: RouteEntry) -> aiohttp.ClientTimeout:
    """`route_timeout` in aiohttp's terms: connect and first byte per socket, the pool wait
    as aiohttp's whole-connection timeout."""
    timeout = route_timeout(route)
    return aiohttp.ClientTimeout(
        sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
    )
