"""Step 4 of the request path: pick the routes that serve a model, in the order to try them."""

from __future__ import annotations

import enum
import os
import random
from dataclasses import dataclass

from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.models import Model
from gateway.providers import ProviderAdapter, adapter_for
from gateway.providers.base import CompletionAdapter, EmbeddingAdapter, StreamingAdapter
from gateway.route_health import is_cooling_down
from gateway.selectors import ModelEntry, RouteEntry

# Draws the first route of weighted models; a test may seed it (`_draw.seed(n)`).
_draw = random.Random()  # noqa: S311 (load balancing, not secrecy)


class Capability(enum.Enum):
    """What a request needs from a route's adapter."""

    CHAT = "chat"
    CHAT_STREAM = "chat_stream"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


def _can(adapter: ProviderAdapter, needs: Capability) -> bool:
    if needs is Capability.CHAT:
        return True
    if needs is Capability.CHAT_STREAM:
        return isinstance(adapter, StreamingAdapter)
    if needs is Capability.COMPLETIONS:
        return isinstance(adapter, CompletionAdapter)
    return isinstance(adapter, EmbeddingAdapter)


@dataclass(frozen=True, slots=True)
class ChosenRoute:
    route: RouteEntry
    adapter: ProviderAdapter
    secret: str  # the provider credential; never logged, never sent to a client


def serveable_routes(
    model: ModelEntry, *, streaming: bool = False, needs: Capability | None = None
) -> list[ChosenRoute]:
    """The routes this process can serve for this request, in the order to try them.

    A route is skipped when its provider names a secret variable that is not set, or its kind
    has no adapter able to do what the request needs (stream, legacy completions,
    embeddings): so the example catalog falls back to the demo provider offline. An ordered
    model keeps catalog order; a weighted one puts first a route drawn by weight among the
    serveable ones (load balancing), the others following in catalog order (failover). Either
    way, routes cooling down after repeated failures (gateway/route_health.py) come last.
    """
    if needs is None:
        needs = Capability.CHAT_STREAM if streaming else Capability.CHAT
    chosen = []
    can_serve_kind = False
    for route in model.routes:
        adapter = adapter_for(route.kind)
        if adapter is None:
            continue
        can_serve_kind = True
        if not _can(adapter, needs):
            continue
        secret = os.environ.get(route.api_key_env, "") if route.api_key_env else ""
        if route.api_key_env and not secret:
            continue
        chosen.append(ChosenRoute(route=route, adapter=adapter, secret=secret))
    if chosen:
        if model.routing == Model.Routing.WEIGHTED:
            chosen = _weighted_first(chosen)
        # Routes cooling down after repeated failures go last, in the same order (stable sort).
        return sorted(chosen, key=lambda option: is_cooling_down(option.route))
    if can_serve_kind and needs is Capability.CHAT_STREAM:
        raise InvalidRequest(
            "Streaming is not supported for this model yet; send 'stream': false.",
            param="stream",
        )
    if can_serve_kind and needs is Capability.COMPLETIONS:
        raise InvalidRequest(
            f"The model '{model.name}' is not served by a provider that offers the legacy "
            "completions API; use /v1/chat/completions.",
            param="model",
        )
    if can_serve_kind and needs is Capability.EMBEDDINGS:
        raise InvalidRequest(
            f"The model '{model.name}' is not served by a provider that offers embeddings.",
            param="model",
        )
    raise UpstreamFailed(f"No provider is available for model '{model.name}'.")


def _weighted_first(routes: list[ChosenRoute]) -> list[ChosenRoute]:
    """`routes` with one drawn by weight moved to the front; weight 0 is never drawn."""
    weights = [chosen.route.weight for chosen in routes]
    if not any(weights):
        return routes
    first = _draw.choices(routes, weights=weights)[0]
    return [first, *(chosen for chosen in routes if chosen is not first)]
