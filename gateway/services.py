"""Writes to the model catalog."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import transaction

from billing.money import ZERO_USD, MoneyError, parse_usd
from gateway.models import Model, Provider, Route


class CatalogError(ValueError):
    """The catalog file is invalid; the message names the offending entry."""


@dataclass
class CatalogLoadReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # In the database but not in the file: kept as they are, never deleted silently.
    not_in_file: list[str] = field(default_factory=list)


def _require(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}.{key} is required (a non-empty string)")
    return value.strip()


def _list_of_mappings(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise CatalogError(f"{key} must be a list of mappings")
    return items


def _price(entry: dict[str, Any], key: str, where: str, *, required: bool) -> Decimal:
    value = entry.get(key)
    if value is None and not required:
        return ZERO_USD
    if not isinstance(value, str | int | Decimal) or isinstance(value, bool):
        raise CatalogError(f'{where}.{key} must be a decimal number, e.g. "0.50" (not a float)')
    try:
        amount = parse_usd(value)
    except MoneyError as exc:
        raise CatalogError(f"{where}.{key}: {exc}") from None
    if amount < ZERO_USD:
        raise CatalogError(f"{where}.{key}: a price cannot be negative")
    return amount


def _positive_int(entry: dict[str, Any], key: str, where: str, default: int) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CatalogError(f"{where}.{key} must be a positive whole number")
    return value


def _provider_fields(entry: dict[str, Any], where: str) -> dict[str, Any]:
    kind = _require(entry, "kind", where)
    if kind not in Provider.Kind.values:
        raise CatalogError(f"{where}.kind must be one of {', '.join(Provider.Kind.values)}")
    base_url = str(entry.get("base_url") or "").strip().rstrip("/")
    if kind != Provider.Kind.DEMO and not base_url.startswith(("http://", "https://")):
        raise CatalogError(f"{where}.base_url is required (an http(s) URL)")
    return {
        "kind": kind,
        "base_url": base_url,
        "api_key_env": str(entry.get("api_key_env") or "").strip(),
        "is_active": bool(entry.get("active", True)),
    }


def _record(report: CatalogLoadReport, label: str, created: bool, changed: bool) -> None:
    if created:
        report.created.append(label)
    elif changed:
        report.updated.append(label)
    else:
        report.unchanged.append(label)


def _upsert(model_class: Any, name: str, fields: dict[str, Any]) -> tuple[Any, bool, bool]:
    obj = model_class.objects.filter(name=name).first()
    if obj is None:
        return model_class.objects.create(name=name, **fields), True, True
    changed = any(getattr(obj, key) != value for key, value in fields.items())
    if changed:
        for key, value in fields.items():
            setattr(obj, key, value)
        obj.save()
    return obj, False, changed


def catalog_load(*, data: Any) -> CatalogLoadReport:
    """Create or update providers and models from a parsed catalog file, all or nothing.

    Idempotent: loading the same file twice changes nothing the second time. Entries missing
    from the file are reported, not deleted. A model's routes are replaced by the file's.
    """
    if not isinstance(data, dict):
        raise CatalogError("the catalog must be a mapping with 'providers' and 'models'")
    report = CatalogLoadReport()
    with transaction.atomic():
        providers: dict[str, Provider] = {}
        for i, entry in enumerate(_list_of_mappings(data, "providers")):
            where = f"providers[{i}]"
            name = _require(entry, "name", where)
            if name in providers:
                raise CatalogError(f"{where}: provider {name!r} is defined twice")
            provider, created, changed = _upsert(Provider, name, _provider_fields(entry, where))
            providers[name] = provider
            _record(report, f"provider {name}", created, changed)

        model_names: set[str] = set()
        for i, entry in enumerate(_list_of_mappings(data, "models")):
            where = f"models[{i}]"
            name = _require(entry, "name", where)
            if name in model_names:
                raise CatalogError(f"{where}: model {name!r} is defined twice")
            model_names.add(name)
            price = entry.get("price")
            if not isinstance(price, dict):
                raise CatalogError(f"{where}.price is required (input and output per 1M tokens)")
            fields = {
                "input_price_per_mtok_usd": _price(price, "input", f"{where}.price", required=True),
                "output_price_per_mtok_usd": _price(
                    price, "output", f"{where}.price", required=True
                ),
                "cached_input_price_per_mtok_usd": _price(
                    price, "cached_input", f"{where}.price", required=False
                ),
                "cache_write_price_per_mtok_usd": (
                    _price(price, "cache_write", f"{where}.price", required=True)
                    if price.get("cache_write") is not None
                    else None
                ),
                "max_output_tokens": _positive_int(entry, "max_output_tokens", where, 4096),
                "context_length": (
                    _positive_int(entry, "context_length", where, 1)
                    if entry.get("context_length") is not None
                    else None
                ),
                "is_active": bool(entry.get("active", True)),
            }
            routes = _routes(entry, where, providers)
            model, created, changed = _upsert(Model, name, fields)
            current = list(model.routes.values_list("provider_id", "upstream_model"))
            if current != [(provider.pk, upstream) for provider, upstream in routes]:
                model.routes.all().delete()
                Route.objects.bulk_create(
                    Route(model=model, provider=provider, upstream_model=upstream, position=n)
                    for n, (provider, upstream) in enumerate(routes)
                )
                changed = True
            _record(report, f"model {name}", created, changed)

        report.not_in_file = [
            f"provider {name}"
            for name in Provider.objects.exclude(name__in=providers).values_list("name", flat=True)
        ] + [
            f"model {name}"
            for name in Model.objects.exclude(name__in=model_names).values_list("name", flat=True)
        ]
    return report


def _routes(
    entry: dict[str, Any], where: str, providers: dict[str, Provider]
) -> list[tuple[Provider, str]]:
    routes = entry.get("routes")
    if not isinstance(routes, list) or not routes:
        raise CatalogError(f"{where}.routes must list at least one route")
    result = []
    for j, route in enumerate(routes):
        route_where = f"{where}.routes[{j}]"
        if not isinstance(route, dict):
            raise CatalogError(f"{route_where} must be a mapping")
        provider_name = _require(route, "provider", route_where)
        if provider_name not in providers:
            raise CatalogError(f"{route_where}.provider {provider_name!r} is not in 'providers'")
        result.append((providers[provider_name], _require(route, "upstream_model", route_where)))
    return result
