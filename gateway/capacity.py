"""How a gateway process answers when it cannot serve: its cap on concurrent `/v1/*` requests
(GATEWAY_MAX_REQUESTS_PER_PROCESS), and a 503 rather than a 500 when the database is down.

Each request counts from its first byte in to its last byte out, so a stream holds its slot
for as long as it flows. Past the cap the process answers 503 at once, in the caller's API's
error shape (OpenAI's; Anthropic's `overloaded_error` on /v1/messages), before reading the
body or touching a dependency: a load balancer (or the client's retry) sends the request to a
process with room, instead of this one running out of memory, file descriptors or upstream
connections. The per-key cap on concurrent requests (gateway/limits.py)
is shared by every process; this one protects one process.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import DatabaseError

from gateway import cors
from gateway.errors import GatewayError, ProcessAtCapacity, ServiceUnavailable, error_answer_on

_ASGIApp = Any


class ProcessCapacity:
    """Wraps the gateway's ASGI handler; one instance per process, on its one event loop."""

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.in_flight >= settings.GATEWAY_MAX_REQUESTS_PER_PROCESS:
            await _answer_busy(scope, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _answer_busy(scope: dict[str, Any], send: Any) -> None:
    error = ProcessAtCapacity(
        "This gateway process is serving as many requests as it is allowed to; retry in a moment."
    )
    # The caller's API's own shape: Anthropic's SDKs read `overloaded_error` on /v1/messages.
    await error_answer_on(error, path=str(scope.get("path", ""))).send_to(
        send, cors.answer_headers(scope)
    )


def unexpected_failure(exc: Exception) -> GatewayError:
    """What a request that failed unexpectedly answers: 503 when the database was unreachable
    (a dependency is down: the caller may retry), 500 for anything else."""
    if isinstance(exc, DatabaseError):
        return ServiceUnavailable("The gateway's database is unavailable; retry in a moment.")
    return GatewayError("The gateway failed to handle this request.")
