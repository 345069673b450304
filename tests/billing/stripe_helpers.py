"""What a browser's Stripe.js would do, for tests that need a saved card without a browser."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from billing.models import BillingProfile
from billing.payments import auto_topup_card_save, card_setup_start
from portal.models import Organization
from tests.stripe_server import PUBLISHABLE_KEY, LocalStripe

T = TypeVar("T")


def save_card(localstripe: LocalStripe, organization: Organization, number: str) -> BillingProfile:
    """Collect a card into a SetupIntent as Stripe.js's confirmCardSetup does, then save it."""
    client_secret = card_setup_start(organization=organization)
    setup_intent_id = client_secret.split("_secret_")[0]
    response = httpx.post(
        f"{localstripe.url}/v1/setup_intents/{setup_intent_id}/confirm",
        json={
            "key": PUBLISHABLE_KEY,
            "use_stripe_sdk": True,
            "client_secret": client_secret,
            "payment_method_data": {
                "type": "card",
                "card": {"number": number, "exp_month": "12", "exp_year": "2040", "cvc": "123"},
                "billing_details": {"address": {"postal_code": "10001"}},
            },
        },
        timeout=10,
    )
    response.raise_for_status()
    return auto_topup_card_save(organization=organization, setup_intent_id=setup_intent_id)


def wait_for(probe: Callable[[], T], *, timeout: float = 20) -> T:
    """Poll until `probe` returns something truthy; fail at the deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout} s")
        time.sleep(0.05)
