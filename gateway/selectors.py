"""Reads of the model catalog for the hot path, through a short per-process cache.

The whole active catalog is small (hundreds of rows at most), so it is loaded in one go and
served from memory; edits show within GATEWAY_CATALOG_CACHE_SECONDS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings

from billing.money import Price
from gateway.models import Model, Route


@dataclass(frozen=True, slots=True)
class RouteEntry:
    provider: str
    kind: str
    base_url: str
    api_key_env: str
    upstream_model: str


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    price: Price
    max_output_tokens: int
    context_length: int | None
    routes: tuple[RouteEntry, ...]


_snapshot: tuple[float, dict[str, ModelEntry]] = (0.0, {})


def _load_catalog() -> dict[str, ModelEntry]:
    routes: dict[int, list[RouteEntry]] = {}
    for route in Route.objects.filter(provider__is_active=True).select_related("provider"):
        routes.setdefault(route.model_id, []).append(
            RouteEntry(
                provider=route.provider.name,
                kind=route.provider.kind,
                base_url=route.provider.base_url,
                api_key_env=route.provider.api_key_env,
                upstream_model=route.upstream_model,
            )
        )
    return {
        model.name: ModelEntry(
            name=model.name,
            price=Price(
                input_per_mtok_usd=model.input_price_per_mtok_usd,
                output_per_mtok_usd=model.output_price_per_mtok_usd,
                cached_input_per_mtok_usd=model.cached_input_price_per_mtok_usd,
                cache_write_input_per_mtok_usd=model.cache_write_price_per_mtok_usd,
            ),
            max_output_tokens=model.max_output_tokens,
            context_length=model.context_length,
            routes=tuple(routes.get(model.pk, ())),
        )
        for model in Model.objects.filter(is_active=True)
    }


async def _catalog() -> dict[str, ModelEntry]:
    global _snapshot
    expires_at, models = _snapshot
    if expires_at <= time.monotonic():
        models = await sync_to_async(_load_catalog)()
        _snapshot = (time.monotonic() + settings.GATEWAY_CATALOG_CACHE_SECONDS, models)
    return models


async def catalog_model(name: str) -> ModelEntry | None:
    """The active model with this name and its active routes in order, or None."""
    return (await _catalog()).get(name)


async def catalog_models() -> list[ModelEntry]:
    """Every active model, by name."""
    return sorted((await _catalog()).values(), key=lambda model: model.name)


def forget_catalog() -> None:
    """Drop the cached catalog so the next request re-reads it (tests, load_catalog)."""
    global _snapshot
    _snapshot = (0.0, {})
