"""Step 4 of the request path: pick the route that serves a model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.providers import ProviderAdapter, adapter_for
from gateway.providers.base import StreamingAdapter
from gateway.selectors import ModelEntry, RouteEntry


@dataclass(frozen=True, slots=True)
class ChosenRoute:
    route: RouteEntry
    adapter: ProviderAdapter
    secret: str  # the provider credential; never logged, never sent to a client


def serveable_routes(model: ModelEntry, *, streaming: bool) -> list[ChosenRoute]:
    """The routes, in catalog order, that this process can serve for this request.

    A route is skipped when its provider names a secret variable that is not set, or its kind
    has no adapter (or none that streams, for a stream): so the example catalog falls back to
    the demo provider offline. The gateway tries them in order, failing over on retryable
    failures before the first byte.
    """
    chosen = []
    can_serve_kind = False
    for route in model.routes:
        adapter = adapter_for(route.kind)
        if adapter is None:
            continue
        can_serve_kind = True
        if streaming and not isinstance(adapter, StreamingAdapter):
            continue
        secret = os.environ.get(route.api_key_env, "") if route.api_key_env else ""
        if route.api_key_env and not secret:
            continue
        chosen.append(ChosenRoute(route=route, adapter=adapter, secret=secret))
    if chosen:
        return chosen
    if streaming and can_serve_kind:
        raise InvalidRequest(
            "Streaming is not supported for this model yet; send 'stream': false.",
            param="stream",
        )
    raise UpstreamFailed(f"No provider is available for model '{model.name}'.")
