"""One Stripe Customer per organisation, created on first need (against localstripe)."""

from __future__ import annotations

import httpx

from billing.models import BillingProfile
from billing.payments import stripe_customer_ensure
from tests.factories import make_org
from tests.stripe_server import SECRET_KEY, LocalStripe


def test_it_creates_one_customer_per_organisation_lazily(localstripe: LocalStripe) -> None:
    first, second = make_org(), make_org()
    assert not BillingProfile.objects.exists()
    customer = stripe_customer_ensure(organization=first)
    assert stripe_customer_ensure(organization=first) == customer
    assert stripe_customer_ensure(organization=second) != customer

    listed = httpx.get(f"{localstripe.url}/v1/customers", auth=(SECRET_KEY, ""), timeout=10)
    customers = {c["id"]: c for c in listed.json()["data"]}
    assert len(customers) == 2
    assert customers[customer]["metadata"] == {"organization_id": str(first.pk)}
    assert BillingProfile.objects.get(organization=first).stripe_customer_id == customer
