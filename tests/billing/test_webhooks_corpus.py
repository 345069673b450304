"""A payment's events, delivered three times each, shuffled, by concurrent workers, leave the
same ledger as one in-order delivery."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest

from billing.models import CardPayment, StripeEvent, StripeLedgerEntry
from billing.selectors import wallet_balance_usd
from portal.models import Organization
from tests.billing.conftest import event, sign
from tests.factories import make_org

pytestmark = pytest.mark.usefixtures("stripe_webhook_secret", "eager_celery")


def corpus(prefix: str, organization: Organization) -> list[bytes]:
    """$100 paid; refunded $20 then $30 more (cumulative $50); $30 disputed, then won.

    The payment row exists first, as the "Add credit" page writes it before the card is paid.
    """
    pi, ch, dp = f"pi_{prefix}", f"ch_{prefix}", f"dp_{prefix}"
    CardPayment.objects.create(
        stripe_payment_intent_id=pi,
        organization=organization,
        amount_usd=Decimal(100),
        origin=CardPayment.Origin.DASHBOARD,
    )
    metadata = {"organization_id": str(organization.pk), "switchboard_origin": "dashboard"}
    intent = {
        "id": pi,
        "object": "payment_intent",
        "amount": 10000,
        "amount_received": 10000,
        "currency": "usd",
        "status": "succeeded",
        "metadata": metadata,
    }
    charge = {"id": ch, "object": "charge", "payment_intent": pi, "currency": "usd"}
    first = {"id": f"re_{prefix}_1", "amount": 2000, "status": "succeeded"}
    second = {"id": f"re_{prefix}_2", "amount": 3000, "status": "succeeded"}
    dispute = {"id": dp, "object": "dispute", "charge": ch, "payment_intent": pi, "amount": 3000}
    return [
        event(f"evt_{prefix}_1", "payment_intent.succeeded", intent),
        event(f"evt_{prefix}_2", "charge.refunded", charge | refunded(first)),
        event(f"evt_{prefix}_3", "charge.refunded", charge | refunded(first, second)),
        event(f"evt_{prefix}_4", "charge.dispute.created", dispute | {"status": "needs_response"}),
        event(f"evt_{prefix}_5", "charge.dispute.funds_withdrawn", dispute),
        event(f"evt_{prefix}_6", "charge.dispute.funds_reinstated", dispute | {"status": "won"}),
    ]


def refunded(*refunds: dict[str, object]) -> dict[str, object]:
    """A charge's refund fields after these refunds (`amount_refunded` is cumulative)."""
    total = sum(int(str(refund["amount"])) for refund in refunds)
    listed = {"object": "list", "data": list(refunds), "has_more": False}
    return {"amount_refunded": total, "refunded": total == 10000, "refunds": listed}


def deliver(url: str, payload: bytes) -> int:
    response = httpx.post(
        url,
        content=payload,
        headers={"Stripe-Signature": sign(payload), "Content-Type": "application/json"},
        timeout=30,
    )
    return response.status_code


def ledger_of(organization: Organization, prefix: str) -> list[tuple[str, Decimal]]:
    return sorted(
        (key.replace(prefix, "X"), amount)
        for key, amount in StripeLedgerEntry.objects.filter(organization=organization).values_list(
            "key", "amount_usd"
        )
    )


def test_it_applies_shuffled_repeated_concurrent_deliveries_exactly_once(
    live_server: object,
) -> None:
    url = f"{live_server}/stripe/webhook"
    in_order = make_org(credit_usd=None)
    shuffled = make_org(credit_usd=None)
    make_org()  # another organisation, untouched

    for payload in corpus("inorder", in_order):
        assert deliver(url, payload) == 200

    deliveries = corpus("shuffled", shuffled) * 3
    random.Random(5).shuffle(deliveries)  # noqa: S311 - a reproducible order, not a secret
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda payload: deliver(url, payload), deliveries))
    assert statuses == [200] * len(deliveries)

    assert wallet_balance_usd(organization_id=in_order.pk) == Decimal("50.00")
    assert wallet_balance_usd(organization_id=shuffled.pk) == Decimal("50.00")
    assert ledger_of(shuffled, "shuffled") == ledger_of(in_order, "inorder")
    assert ledger_of(in_order, "inorder") == sorted(
        [
            ("pi_X:credit", Decimal("100.00")),
            ("ch_X:refund:re_X_1", Decimal("-20.00")),
            ("ch_X:refund:re_X_2", Decimal("-30.00")),
            ("dp_X:withdrawn", Decimal("-30.00")),
            ("dp_X:reinstated", Decimal("30.00")),
        ]
    )
    assert StripeEvent.objects.filter(processed_at__isnull=True).count() == 0
    assert StripeEvent.objects.count() == 12
    assert CardPayment.objects.get(stripe_payment_intent_id="pi_shuffled").status == "succeeded"
