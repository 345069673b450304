"""What a browser's Stripe.js (or someone in the Stripe dashboard) would do, for tests that need
Stripe objects without a browser."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import httpx

from billing.models import BillingProfile, CardPayment
from billing.payments import (
    PaymentError,
    auto_topup_card_save,
    card_setup_start,
    new_request_token,
    stripe_customer_ensure,
    stripe_event_process,
    stripe_event_record,
    topup_start,
)
from portal.models import Membership, Organization
from tests.stripe_server import PUBLISHABLE_KEY, SECRET_KEY, LocalStripe

T = TypeVar("T")


GOOD_CARD = "4242424242424242"
DECLINED_ON_CHARGE = "4000000000000341"  # saves fine, every charge is declined


def collect_card(localstripe: LocalStripe, organization: Organization, number: str) -> str:
    """Collect a card into a SetupIntent as Stripe.js's confirmCardSetup does; its id."""
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
    return setup_intent_id


def save_card(localstripe: LocalStripe, organization: Organization, number: str) -> BillingProfile:
    """Collect a card, then save it as the auto top-up card."""
    setup_intent_id = collect_card(localstripe, organization, number)
    return auto_topup_card_save(organization=organization, setup_intent_id=setup_intent_id)


def card_paid(
    localstripe: LocalStripe, organization: Organization, *, cents: int, number: str = GOOD_CARD
) -> CardPayment:
    """Pay as the "Add credit" page does, and wait until localstripe's own webhook about the
    payment has been applied (credited, or marked failed for a declined card)."""
    setup_intent_id = collect_card(localstripe, organization, number)
    owner = Membership.objects.filter(organization=organization, role=Membership.Role.OWNER)
    # A declined card raises PaymentError; its payment_failed event records the payment.
    with contextlib.suppress(PaymentError):
        topup_start(
            organization=organization,
            user=owner.get().user,
            amount_usd=Decimal(cents) / 100,
            setup_intent_id=setup_intent_id,
            request_token=new_request_token(),
        )
    found = wait_for(
        lambda: (
            CardPayment.objects.filter(organization=organization)
            .exclude(status=CardPayment.Status.PENDING)
            .order_by("-pk")
            .first()
        )
    )
    assert found is not None  # wait_for returns only a truthy value
    return found


def _stripe(localstripe: LocalStripe, method: str, path: str, **data: object) -> dict[str, Any]:
    """A call to localstripe as the Stripe dashboard (or a support agent) would make it."""
    response = httpx.request(
        method, f"{localstripe.url}{path}", data=data, auth=(SECRET_KEY, ""), timeout=10
    )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def charge_of(localstripe: LocalStripe, payment: CardPayment) -> str:
    intent = _stripe(localstripe, "GET", f"/v1/payment_intents/{payment.stripe_payment_intent_id}")
    return str(intent["latest_charge"]["id"])


def auto_topup_intents(localstripe: LocalStripe, organization: Organization) -> list[str]:
    """The organisation's auto top-up PaymentIntents in Stripe, oldest first (a declined one
    has no CardPayment row until its `payment_failed` event is applied)."""
    listed = _stripe(localstripe, "GET", "/v1/payment_intents")["data"]  # 10 at most
    return [
        str(intent["id"])
        for intent in listed
        if intent["metadata"].get("organization_id") == str(organization.pk)
        and intent["metadata"].get("switchboard_origin") == CardPayment.Origin.AUTO_TOPUP
    ]


def refund(localstripe: LocalStripe, charge_id: str, cents: int) -> str:
    """Refund part of a charge in Stripe (localstripe sends no `charge.refunded` event)."""
    return str(_stripe(localstripe, "POST", "/v1/refunds", charge=charge_id, amount=cents)["id"])


def refund_status_set(localstripe: LocalStripe, refund_id: str, status: str) -> None:
    """Set a refund's status in localstripe, as the card network's later answer does in Stripe
    (a refund to a closed card account fails days after it succeeded). localstripe has no way
    to make a refund fail, but lets its status be written; it sends no event about it."""
    _stripe(localstripe, "POST", f"/v1/refunds/{refund_id}", status=status)


def refund_event_object(refund_id: str, charge_id: str) -> dict[str, object]:
    """A failed refund as `refund.failed`, `refund.updated` and `charge.refund.updated` carry it."""
    return {
        "id": refund_id,
        "object": "refund",
        "charge": charge_id,
        "status": "failed",
        "failure_reason": "expired_or_canceled_card",
    }


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


def paid_in_currency(
    localstripe: LocalStripe, organization: Organization, *, cents: int, currency: str
) -> tuple[str, str]:
    """A PaymentIntent paid in `currency` with this portal's metadata, as one made in the
    Stripe dashboard would be (the portal only ever asks for USD); its id and its charge's."""
    customer_id = stripe_customer_ensure(organization=organization)
    setup_intent_id = collect_card(localstripe, organization, GOOD_CARD)
    card = _stripe(localstripe, "GET", f"/v1/setup_intents/{setup_intent_id}")["payment_method"]
    metadata = {"organization_id": str(organization.pk), "switchboard_origin": "dashboard"}
    intent = _stripe(
        localstripe,
        "POST",
        "/v1/payment_intents",
        amount=cents,
        currency=currency,
        customer=customer_id,
        payment_method=card,
        confirm="true",
        **{f"metadata[{key}]": value for key, value in metadata.items()},
    )
    pi = str(intent["id"])
    charge = _stripe(localstripe, "GET", f"/v1/payment_intents/{pi}")["latest_charge"]
    return pi, str(charge["id"])


def deliver(payload: bytes) -> str:
    """Store and process an event as the webhook and its task do (task called directly)."""
    stored = stripe_event_record(event=json.loads(payload))
    assert stored is not None
    return stripe_event_process(event_id=stored.event_id)
