"""Writes to the model catalog."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import transaction

from billing.money import ZERO_USD, MoneyError, parse_usd
from gateway.models import Model, ModelAlias, Provider, Route


class CatalogError(ValueError):
    """The catalog file is invalid; the message names the offending entry."""


@dataclass
class CatalogLoadReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # In the database but not in the file: kept as they are, never deleted silently.
    not_in_file: list[str] = field(default_factory=list)


# The largest whole number the catalog's PositiveIntegerField columns hold (PostgreSQL's
# integer); a larger one would fail the write with a DataError instead of naming the entry.
MAX_WHOLE_NUMBER = 2**31 - 1


def _fitting(value: str, where: str, model_class: Any, field_name: str) -> str:
    """`value`, if the column it goes to (`model_class.field_name`) is long enough for it."""
    max_length: int = model_class._meta.get_field(field_name).max_length
    if len(value) > max_length:
        raise CatalogError(f"{where} is too long: at most {max_length} characters")
    return value


def _require(
    entry: dict[str, Any], key: str, where: str, *, column: tuple[Any, str] | None = None
) -> str:
    """A non-empty string; `column` (model class, field name): the column it is stored in."""
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}.{key} is required (a non-empty string)")
    if column is not None:
        return _fitting(value.strip(), f"{where}.{key}", *column)
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
    if value > MAX_WHOLE_NUMBER:
        raise CatalogError(f"{where}.{key} is too large: at most {MAX_WHOLE_NUMBER}")
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
        "base_url": _fitting(base_url, f"{where}.base_url", Provider, "base_url"),
        "api_key_env": _fitting(
            str(entry.get("api_key_env") or "").strip(),
            f"{where}.api_key_env",
            Provider,
            "api_key_env",
        ),
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
            name = _require(entry, "name", where, column=(Provider, "name"))
            if name in providers:
                raise CatalogError(f"{where}: provider {name!r} is defined twice")
            provider, created, changed = _upsert(Provider, name, _provider_fields(entry, where))
            providers[name] = provider
            _record(report, f"provider {name}", created, changed)

        model_names: set[str] = set()
        aliases_seen: dict[str, str] = {}  # alias -> the model of the file that claims it
        pending_aliases: list[ModelAlias] = []
        for i, entry in enumerate(_list_of_mappings(data, "models")):
            where = f"models[{i}]"
            name = _require(entry, "name", where, column=(Model, "name"))
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
                "image_input_tokens": _positive_int(entry, "image_tokens", where, 2000),
                "context_length": (
                    _positive_int(entry, "context_length", where, 1)
                    if entry.get("context_length") is not None
                    else None
                ),
                "routing": _routing(entry, where),
                "is_active": bool(entry.get("active", True)),
            }
            routes = _routes(entry, where, providers)
            aliases = _aliases(entry, where)
            for alias in aliases:
                if alias in aliases_seen:
                    raise CatalogError(f"{where}.aliases: {alias!r} is used twice")
                aliases_seen[alias] = name
            model, created, changed = _upsert(Model, name, fields)
            current = list(model.routes.values_list(*_ROUTE_FIELDS))
            if current != [route.values() for route in routes]:
                model.routes.all().delete()
                Route.objects.bulk_create(
                    Route(model=model, position=n, **route.fields())
                    for n, route in enumerate(routes)
                )
                changed = True
            if list(model.aliases.order_by("name").values_list("name", flat=True)) != aliases:
                model.aliases.all().delete()
                pending_aliases.extend(ModelAlias(name=alias, model=model) for alias in aliases)
                changed = True
            _record(report, f"model {name}", created, changed)

        _check_aliases(aliases_seen, model_names)
        # Created last, once every model of the file has let go of the aliases it dropped.
        ModelAlias.objects.bulk_create(pending_aliases)

        report.not_in_file = [
            f"provider {name}"
            for name in Provider.objects.exclude(name__in=providers).values_list("name", flat=True)
        ] + [
            f"model {name}"
            for name in Model.objects.exclude(name__in=model_names).values_list("name", flat=True)
        ]
    return report


_ROUTE_FIELDS = (
    "provider_id",
    "upstream_model",
    "weight",
    "connect_timeout_seconds",
    "first_byte_timeout_seconds",
    "idle_timeout_seconds",
)
_TIMEOUTS = {
    "connect": "connect_timeout_seconds",
    "first_byte": "first_byte_timeout_seconds",
    "idle": "idle_timeout_seconds",
}


@dataclass(frozen=True)
class _RouteSpec:
    provider: Provider
    upstream_model: str
    weight: int
    timeouts: dict[str, float | None]  # model field name -> seconds, None: the default

    def fields(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "upstream_model": self.upstream_model,
            "weight": self.weight,
            **self.timeouts,
        }

    def values(self) -> tuple[Any, ...]:
        return (
            self.provider.pk,
            self.upstream_model,
            self.weight,
            *(self.timeouts[name] for name in _ROUTE_FIELDS[3:]),
        )


def _routing(entry: dict[str, Any], where: str) -> str:
    routing = entry.get("routing", Model.Routing.ORDERED)
    if routing not in Model.Routing.values:
        raise CatalogError(f"{where}.routing must be one of {', '.join(Model.Routing.values)}")
    return str(routing)


def _aliases(entry: dict[str, Any], where: str) -> list[str]:
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(
        isinstance(alias, str) and alias.strip() for alias in aliases
    ):
        raise CatalogError(f"{where}.aliases must be a list of names")
    return sorted(
        {_fitting(alias.strip(), f"{where}.aliases", ModelAlias, "name") for alias in aliases}
    )


def _check_aliases(aliases: dict[str, str], model_names: set[str]) -> None:
    """An alias names one model, and never shadows a model's own name."""
    for alias, owner in aliases.items():
        if alias in model_names:
            raise CatalogError(f"model {owner}: alias {alias!r} is the name of a model")
    if clash := Model.objects.filter(name__in=aliases).values_list("name", flat=True).first():
        raise CatalogError(f"model {aliases[clash]}: alias {clash!r} is the name of a model")
    taken = (
        ModelAlias.objects.filter(name__in=aliases)
        .exclude(model__name__in=model_names)
        .values_list("name", "model__name")
        .first()
    )
    if taken is not None:
        raise CatalogError(
            f"model {aliases[taken[0]]}: alias {taken[0]!r} already names model {taken[1]}"
        )


def _timeout(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal) or value <= 0:
        raise CatalogError(f"{where} must be a positive number of seconds")
    return float(value)


def _routes(entry: dict[str, Any], where: str, providers: dict[str, Provider]) -> list[_RouteSpec]:
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
        weight = route.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise CatalogError(f"{route_where}.weight must be a whole number, 0 or more")
        if weight > MAX_WHOLE_NUMBER:
            raise CatalogError(f"{route_where}.weight is too large: at most {MAX_WHOLE_NUMBER}")
        timeouts = route.get("timeouts") or {}
        if not isinstance(timeouts, dict) or set(timeouts) - set(_TIMEOUTS):
            raise CatalogError(
                f"{route_where}.timeouts may only set {', '.join(_TIMEOUTS)} (in seconds)"
            )
        result.append(
            _RouteSpec(
                provider=providers[provider_name],
                upstream_model=_require(
                    route, "upstream_model", route_where, column=(Route, "upstream_model")
                ),
                weight=weight,
                timeouts={
                    field_name: _timeout(timeouts.get(key), f"{route_where}.timeouts.{key}")
                    for key, field_name in _TIMEOUTS.items()
                },
            )
        )
    if _routing(entry, where) == Model.Routing.WEIGHTED and not any(r.weight for r in result):
        raise CatalogError(f"{where}.routes: weighted routing needs a route of weight 1 or more")
    return result
