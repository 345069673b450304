"""The operator's admin refuses what the catalog loader refuses: a negative price (every
request for the model would fail: a reservation cannot be negative) and a route timeout of 0
or less (the HTTP client reads it as no timeout at all). It shows prices as plain decimals."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.models import Model, Provider

pytestmark = pytest.mark.django_db

NO_INLINES = {
    f"{prefix}-{field}": value
    for prefix in ("routes", "aliases")
    for field, value in (("TOTAL_FORMS", "0"), ("INITIAL_FORMS", "0"))
}


def _model_form(**prices: str) -> dict[str, str]:
    return {
        "name": "priced",
        "input_price_per_mtok_usd": "1",
        "output_price_per_mtok_usd": "2",
        "cached_input_price_per_mtok_usd": "0",
        "cache_write_price_per_mtok_usd": "",
        "max_output_tokens": "100",
        "image_input_tokens": "2000",
        "routing": "ordered",
        "is_active": "on",
        **NO_INLINES,
        **prices,
    }


@pytest.mark.parametrize(
    "field",
    [
        "input_price_per_mtok_usd",
        "output_price_per_mtok_usd",
        "cached_input_price_per_mtok_usd",
        "cache_write_price_per_mtok_usd",
    ],
)
def test_a_negative_model_price_is_refused(admin_client, field):
    response = admin_client.post("/admin/gateway/model/add/", _model_form(**{field: "-0.01"}))

    assert response.status_code == 200
    assert "greater than or equal to 0" in response.content.decode()
    assert not Model.objects.filter(name="priced").exists()


def test_free_models_are_still_allowed(admin_client):
    form = _model_form(input_price_per_mtok_usd="0", output_price_per_mtok_usd="0")

    response = admin_client.post("/admin/gateway/model/add/", form)

    assert response.status_code == 302
    assert Model.objects.filter(name="priced").exists()


@pytest.mark.parametrize("field", ["connect", "first_byte", "idle"])
@pytest.mark.parametrize(("seconds", "saved"), [("0", False), ("-1", False), ("0.5", True)])
def test_a_route_timeout_must_be_positive(admin_client, field, seconds, saved):
    provider = Provider.objects.create(name="acme", kind=Provider.Kind.DEMO)
    route = {
        "routes-TOTAL_FORMS": "1",
        "routes-0-position": "0",
        "routes-0-provider": str(provider.pk),
        "routes-0-upstream_model": "m",
        "routes-0-weight": "1",
        f"routes-0-{field}_timeout_seconds": seconds,
    }

    response = admin_client.post("/admin/gateway/model/add/", _model_form(**route))

    assert Model.objects.filter(name="priced").exists() == saved
    if not saved:
        assert "Enter a positive number of seconds." in response.content.decode()


def test_prices_are_shown_plainly(admin_client):
    model = Model.objects.create(
        name="free", input_price_per_mtok_usd=Decimal("0"), output_price_per_mtok_usd=Decimal("1.5")
    )
    model.refresh_from_db()  # at the money scale, as the admin reads it: 0 is Decimal('0E-10')

    page = admin_client.get(f"/admin/gateway/model/{model.pk}/change/").content.decode()

    assert 'value="0.0000000000"' in page and 'value="1.5000000000"' in page
    assert "0E-10" not in page
