"""CORS on `/v1/*`: the headers that let a web page call the API from a browser (the openai SDK
with `dangerouslyAllowBrowser`, the anthropic SDK with `anthropic-dangerous-direct-browser-
access`), as OpenAI's and Anthropic's own APIs allow it.

The origins allowed are GATEWAY_CORS_ALLOWED_ORIGINS: `*` (the default), a list, or none (no
CORS headers at all; a preflight then gets the 405 any other OPTIONS gets). `*` is safe here
because a key travels as a bearer token the page itself sets, never as a cookie the browser
adds: no credentials are allowed (`Access-Control-Allow-Credentials` is never sent), so a
site can only spend a key it already holds.

A preflight (OPTIONS with `Origin` and `Access-Control-Request-Method`) on any `/v1/*` path
answers 204, echoing the headers asked for (the openai SDK adds `x-stainless-*` headers, and
new ones with its releases: an allow-list would break it, as it broke other gateways). Every
other `/v1/*` answer (whole, streamed, or an error) carries the allowed origin and exposes the
headers a client reads. With `*`, those headers are one tuple built once per setting: the
request path only appends them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from gateway.wire import COST_HEADER, RequestHeaders

Headers = Sequence[tuple[bytes, bytes]]

ALLOWED_METHODS = b"GET, HEAD, POST"
# The answer headers a client reads beyond the CORS-safelisted ones: the request id (OpenAI's
# name, and Anthropic's), the charge, the wait asked for on a 429 or 503, and whether an SDK
# should retry.
EXPOSED_HEADERS = ", ".join(
    ["x-request-id", "request-id", COST_HEADER, "retry-after", "x-should-retry"]
).encode()
# How long a browser may reuse a preflight's answer, in seconds (Chromium caps it at 7200,
# Firefox at 86400).
MAX_AGE_SECONDS = 86400


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """What GATEWAY_CORS_ALLOWED_ORIGINS allows, with the headers it adds built once."""

    any_origin: bool
    origins: frozenset[str]  # when not any_origin; empty: CORS is off
    answer_headers: tuple[tuple[bytes, bytes], ...]  # with `*`: what every answer carries

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)


@functools.cache
def _policy_for(allowed_origins: tuple[str, ...]) -> CorsPolicy:
    any_origin = allowed_origins == ("*",)
    return CorsPolicy(
        any_origin=any_origin,
        origins=frozenset() if any_origin else frozenset(allowed_origins),
        answer_headers=(
            (
                (b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", EXPOSED_HEADERS),
            )
            if any_origin
            else ()
        ),
    )


def _policy() -> CorsPolicy:
    return _policy_for(settings.GATEWAY_CORS_ALLOWED_ORIGINS)


def answer_headers(scope: dict[str, Any]) -> Headers:
    """The CORS headers a `/v1/*` answer carries: with `*`, the same tuple every time."""
    policy = _policy()
    if policy.any_origin or not policy.origins:
        return policy.answer_headers
    # A list of origins: the answer names the caller's origin when it is allowed, and varies
    # by it either way (a cache must not give one origin's answer to another).
    origin = RequestHeaders(scope["headers"]).get("origin")
    if origin is None or origin not in policy.origins:
        return ((b"vary", b"origin"),)
    return (
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", EXPOSED_HEADERS),
        (b"vary", b"origin"),
    )


def preflight_headers(scope: dict[str, Any]) -> Headers | None:
    """The headers of the 204 that answers a CORS preflight; None when the request is not one
    (no `Origin` or no `Access-Control-Request-Method`) or CORS is off."""
    policy = _policy()
    if not policy.enabled:
        return None
    asked = RequestHeaders(scope["headers"])
    origin = asked.get("origin")
    if origin is None or asked.get("access-control-request-method") is None:
        return None
    headers = [(b"vary", b"origin, access-control-request-headers")]
    if not policy.any_origin and origin not in policy.origins:
        return headers  # no CORS headers: the browser refuses the call
    headers += [
        (b"access-control-allow-origin", b"*" if policy.any_origin else origin.encode("latin-1")),
        (b"access-control-allow-methods", ALLOWED_METHODS),
        (b"access-control-max-age", str(MAX_AGE_SECONDS).encode()),
    ]
    requested = asked.get("access-control-request-headers")
    if requested:
        headers.append((b"access-control-allow-headers", requested.encode("latin-1")))
    return headers
