"""Step 4 of the request path: pick the route that serves a model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gateway.errors import UpstreamFailed
from gateway.providers import ProviderAdapter, adapter_for
from gateway.selectors import ModelEntry, RouteEntry


@dataclass(frozen=True, slots=True)
class ChosenRoute:
    route: RouteEntry
    adapter: ProviderAdapter
    secret: str  # the provider credential; never logged, never sent to a client


def choose_route(model: ModelEntry) -> ChosenRoute:
    """The first route, in catalog order, that this process can serve.

    A route is skipped when its provider names a secret variable that is not set, or its kind
    has no adapter yet: so the example catalog falls back to the demo provider offline.
    """
    for route in model.routes:
        adapter = adapter_for(route.kind)
        if adapter is None:
            continue
        secret = os.environ.get(route.api_key_env, "") if route.api_key_env else ""
        if route.api_key_env and not secret:
            continue
        return ChosenRoute(route=route, adapter=adapter, secret=secret)
    raise UpstreamFailed(f"No provider is available for model '{model.name}'.")
