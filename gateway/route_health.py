"""Route health: a route that failed several times in a row is tried last for a while.

Without it, every request to a model whose first route is down pays for that route's failure
(a refused connection at best, a first-byte timeout at worst) before failing over. After
GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN consecutive retryable failures (unreachable, timed out,
5xx, 429, before the first byte) a route is "cooling down" for GATEWAY_ROUTE_COOLDOWN_SECONDS:
requests still may use it, but after the model's other routes. When the cool-down ends it is
tried in its own place again; one success forgets its failures, one more failure starts
another cool-down at once (it is still over the threshold).

The state is per process, in memory, on the process's one event loop: each gateway process
learns a route's health from its own requests, and a restart forgets it. That is enough to
spare most requests a dead route, and needs no shared store on the hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from gateway.selectors import RouteEntry


@dataclass(slots=True)
class _Health:
    consecutive_failures: int = 0
    cooling_until: float = 0.0  # time.monotonic(); 0: not cooling down


# A deployment is one provider's upstream model, whichever catalog models route to it.
_routes: dict[tuple[str, str], _Health] = {}


def _key(route: RouteEntry) -> tuple[str, str]:
    return (route.provider, route.upstream_model)


def route_failed(route: RouteEntry) -> None:
    """Count a retryable failure of `route` before its first byte; past the threshold, the
    route cools down."""
    health = _routes.setdefault(_key(route), _Health())
    health.consecutive_failures += 1
    if health.consecutive_failures >= settings.GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN:
        health.cooling_until = time.monotonic() + settings.GATEWAY_ROUTE_COOLDOWN_SECONDS


def route_succeeded(route: RouteEntry) -> None:
    """`route` answered: its failures are forgotten."""
    _routes.pop(_key(route), None)


def is_cooling_down(route: RouteEntry) -> bool:
    health = _routes.get(_key(route))
    return health is not None and health.cooling_until > time.monotonic()


def forget_route_health() -> None:
    """Forget every route's failures (tests start from healthy routes)."""
    _routes.clear()
