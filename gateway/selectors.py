"""Reads of the model catalog for the hot path, through a short per-process cache.

The whole active catalog is small (hundreds of rows at most), so it is loaded in one go and
served from memory; edits show within GATEWAY_CATALOG_CACHE_SECONDS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from billing.money import Price
from gateway.database import db_call, load_once
from gateway.models import Model, ModelAlias, Route


@dataclass(frozen=True, slots=True)
class RouteEntry:
    provider: str
    kind: str
    base_url: str
    api_key_env: str
    upstream_model: str
    weight: int = 1  # share of first attempts when the model routes by weight
    # Seconds; the route's own or the GATEWAY_*_TIMEOUT_SECONDS defaults.
    connect_timeout_seconds: float = 10.0
    first_byte_timeout_seconds: float = 600.0
    idle_timeout_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    price: Price
    max_output_tokens: int
    context_length: int | None
    routes: tuple[RouteEntry, ...]
    image_input_tokens: int = 2000  # reserved per image a request sends
    routing: str = Model.Routing.ORDERED
    aliases: tuple[str, ...] = ()


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
                weight=route.weight,
                connect_timeout_seconds=_or_default(
                    route.connect_timeout_seconds, settings.GATEWAY_CONNECT_TIMEOUT_SECONDS
                ),
                first_byte_timeout_seconds=_or_default(
                    route.first_byte_timeout_seconds, settings.GATEWAY_READ_TIMEOUT_SECONDS
                ),
                idle_timeout_seconds=_or_default(
                    route.idle_timeout_seconds, settings.GATEWAY_IDLE_TIMEOUT_SECONDS
                ),
            )
        )
    aliases: dict[int, list[str]] = {}
    for alias_name, model_id in ModelAlias.objects.order_by("name").values_list("name", "model_id"):
        aliases.setdefault(model_id, []).append(alias_name)
    models = {
        model.name: ModelEntry(
            name=model.name,
            price=Price(
                input_per_mtok_usd=model.input_price_per_mtok_usd,
                output_per_mtok_usd=model.output_price_per_mtok_usd,
                cached_input_per_mtok_usd=model.cached_input_price_per_mtok_usd,
                cache_write_input_per_mtok_usd=model.cache_write_price_per_mtok_usd,
            ),
            max_output_tokens=model.max_output_tokens,
            image_input_tokens=model.image_input_tokens,
            context_length=model.context_length,
            routes=tuple(routes.get(model.pk, ())),
            routing=model.routing,
            aliases=tuple(aliases.get(model.pk, ())),
        )
        for model in Model.objects.filter(is_active=True)
    }
    # An alias is one more key to the same entry; a model's own name wins over an alias.
    for entry in list(models.values()):
        for alias_name in entry.aliases:
            models.setdefault(alias_name, entry)
    return models


def _or_default(seconds: float | None, default: float) -> float:
    return float(default) if seconds is None else seconds


async def _catalog() -> dict[str, ModelEntry]:
    expires_at, models = _snapshot
    if expires_at <= time.monotonic():
        models = await load_once("catalog", _reloaded_catalog)
    return models


async def _reloaded_catalog() -> dict[str, ModelEntry]:
    global _snapshot
    models = await db_call(_load_catalog)()
    _snapshot = (time.monotonic() + settings.GATEWAY_CATALOG_CACHE_SECONDS, models)
    return models


async def catalog_model(name: str) -> ModelEntry | None:
    """The active model with this name or alias and its active routes in order, or None."""
    return (await _catalog()).get(name)


async def catalog_models() -> list[ModelEntry]:
    """Every active model, by name (once, whatever its aliases)."""
    models = {entry.name: entry for entry in (await _catalog()).values()}
    return [models[name] for name in sorted(models)]


def forget_catalog() -> None:
    """Drop the cached catalog so the next request re-reads it (tests, load_catalog)."""
    global _snapshot
    _snapshot = (0.0, {})
