"""The catalog page: every active model with its prices (USD per 1M tokens) and context length.

The gateway owns the catalog, so it renders this page itself (a plain sync Django view, mounted
at /catalog/ by portal/urls.py); `/v1/models` is the same data for code.
"""

from __future__ import annotations

from decimal import Decimal

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from gateway.models import Model


def _plain(amount: Decimal) -> str:
    """A price as written, without trailing zeros or an exponent: 0.5000000000 -> 0.5."""
    return f"{amount.normalize():f}"


def catalog_page(request: HttpRequest) -> HttpResponse:
    rows = [
        {
            "name": model.name,
            "input": _plain(model.input_price_per_mtok_usd),
            "output": _plain(model.output_price_per_mtok_usd),
            "cached_input": _plain(model.cached_input_price_per_mtok_usd),
            "cache_write": _plain(
                model.cache_write_price_per_mtok_usd
                if model.cache_write_price_per_mtok_usd is not None
                else model.input_price_per_mtok_usd
            ),
            "context_length": model.context_length,
            "max_output_tokens": model.max_output_tokens,
        }
        for model in Model.objects.filter(is_active=True).order_by("name")
    ]
    return render(request, "gateway/catalog.html", {"models": rows})


urlpatterns = [path("", catalog_page, name="catalog")]
