"""A payment's events, delivered three times each, shuffled, by concurrent workers, leave the
same ledger as one in-order delivery; the month's statement shows each movement on its own
line and agrees with the ledger."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx

from billing.models import BillingCursor, CardPayment, Statement, StripeEvent, StripeLedgerEntry
from billing.selectors import ledger_violations, wallet_balance_usd
from billing.statements import next_month, statement_figures, statements_issue_due
from portal.models import Organization
from tests.billing.conftest import event, sign
from tests.billing.stripe_helpers import (
    card_paid,
    charge_of,
    refund,
    refund_event_object,
    refund_status_set,
)
from tests.billing.test_statements import GRACE, snapshot
from tests.factories import make_org
from tests.stripe_server import LocalStripe


@dataclass(frozen=True)
class Corpus:
    events: list[bytes]
    names: dict[str, str]  # Stripe id -> a name that is the same in every corpus


def corpus(localstripe: LocalStripe, prefix: str, organization: Organization) -> Corpus:
    """$100 paid; refunded $20 then $30 more (cumulative $50); $30 disputed, then won.

    The payment and refunds are made in localstripe (the webhook re-fetches them from there);
    localstripe has no disputes, so their events carry the dispute, as Stripe's do.
    """
    payment = card_paid(localstripe, organization, cents=10000)
    pi, ch, dp = payment.stripe_payment_intent_id, charge_of(localstripe, payment), f"dp_{prefix}"
    first = {"id": refund(localstripe, ch, 2000), "amount": 2000, "status": "succeeded"}
    second = {"id": refund(localstripe, ch, 3000), "amount": 3000, "status": "succeeded"}
    metadata = {"organization_id": str(organization.pk), "switchboard_origin": "dashboard"}
    intent = {"id": pi, "object": "payment_intent", "amount": 10000, "metadata": metadata}
    charge = {"id": ch, "object": "charge", "payment_intent": pi, "currency": "usd"}
    dispute = {
        "id": dp,
        "object": "dispute",
        "charge": ch,
        "payment_intent": pi,
        "amount": 3000,
        "currency": "usd",
    }
    return Corpus(
        events=[
            event(f"evt_{prefix}_1", "payment_intent.succeeded", intent),
            event(f"evt_{prefix}_2", "charge.refunded", charge | refunded(first)),
            event(f"evt_{prefix}_3", "charge.refunded", charge | refunded(first, second)),
            event(
                f"evt_{prefix}_4", "charge.dispute.created", dispute | {"status": "needs_response"}
            ),
            event(f"evt_{prefix}_5", "charge.dispute.funds_withdrawn", dispute),
            event(
                f"evt_{prefix}_6", "charge.dispute.funds_reinstated", dispute | {"status": "won"}
            ),
        ],
        names={pi: "pi", ch: "ch", str(first["id"]): "re1", str(second["id"]): "re2", dp: "dp"},
    )


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


def ledger_of(organization: Organization, names: dict[str, str]) -> list[tuple[str, Decimal]]:
    def named(key: str) -> str:
        return ":".join(names.get(part, part) for part in key.split(":"))

    return sorted(
        (named(key), amount)
        for key, amount in StripeLedgerEntry.objects.filter(organization=organization).values_list(
            "key", "amount_usd"
        )
    )


def test_it_applies_shuffled_repeated_concurrent_deliveries_exactly_once(
    localstripe: LocalStripe, live_server: object
) -> None:
    url = f"{live_server}/stripe/webhook"
    in_order = make_org(credit_usd=None)
    shuffled = make_org(credit_usd=None)
    make_org()  # another organisation, untouched
    ordered_corpus = corpus(localstripe, "inorder", in_order)
    shuffled_corpus = corpus(localstripe, "shuffled", shuffled)

    for payload in ordered_corpus.events:
        assert deliver(url, payload) == 200
    deliveries = shuffled_corpus.events * 3
    random.Random(5).shuffle(deliveries)  # noqa: S311 - a reproducible order, not a secret
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda payload: deliver(url, payload), deliveries))

    assert statuses == [200] * len(deliveries)
    assert wallet_balance_usd(organization_id=in_order.pk) == Decimal("50.00")
    assert wallet_balance_usd(organization_id=shuffled.pk) == Decimal("50.00")
    assert ledger_of(shuffled, shuffled_corpus.names) == ledger_of(in_order, ordered_corpus.names)
    assert ledger_of(in_order, ordered_corpus.names) == sorted(
        [
            ("pi:credit", Decimal("100.00")),
            ("ch:refund:re1", Decimal("-20.00")),
            ("ch:refund:re2", Decimal("-30.00")),
            ("dp:withdrawn", Decimal("-30.00")),
            ("dp:reinstated", Decimal("30.00")),
        ]
    )
    assert StripeEvent.objects.filter(processed_at__isnull=True).count() == 0
    assert StripeEvent.objects.filter(event_id__startswith="evt_inorder_").count() == 6
    assert StripeEvent.objects.filter(event_id__startswith="evt_shuffled_").count() == 6
    assert CardPayment.objects.get(organization=shuffled).status == "succeeded"
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == []


def test_a_failed_refunds_events_repeated_and_concurrent_give_it_back_once(
    localstripe: LocalStripe, live_server: object
) -> None:
    url = f"{live_server}/stripe/webhook"
    organization = make_org(credit_usd=None)
    make_org()  # another organisation, untouched
    payment = card_paid(localstripe, organization, cents=10000)
    pi, ch = payment.stripe_payment_intent_id, charge_of(localstripe, payment)
    kept, failing = refund(localstripe, ch, 2000), refund(localstripe, ch, 3000)
    charge = {"id": ch, "object": "charge", "payment_intent": pi, "currency": "usd"}
    assert deliver(url, event("evt_rfc_refunded", "charge.refunded", charge)) == 200
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(50)
    refund_status_set(localstripe, failing, "failed")
    failed = refund_event_object(failing, ch)
    events = [
        event(f"evt_rfc_{kind}", kind, failed)
        for kind in ("refund.failed", "refund.updated", "charge.refund.updated")
    ] + [event("evt_rfc_refunded_late", "charge.refunded", charge)]

    deliveries = events * 3
    random.Random(7).shuffle(deliveries)  # noqa: S311 - a reproducible order, not a secret
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda payload: deliver(url, payload), deliveries))

    assert statuses == [200] * len(deliveries)
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(80)
    names = {pi: "pi", ch: "ch", kept: "kept", failing: "failing"}
    assert ledger_of(organization, names) == sorted(
        [
            ("pi:credit", Decimal("100.00")),
            ("ch:refund:kept", Decimal("-20.00")),
            ("ch:refund:failing", Decimal("-30.00")),
            ("ch:refund:failing:failed", Decimal("30.00")),
        ]
    )
    assert StripeEvent.objects.filter(processed_at__isnull=True).count() == 0


def test_the_months_statement_gives_each_card_movement_its_own_line_and_matches_the_ledger(
    localstripe: LocalStripe, live_server: object
) -> None:
    url = f"{live_server}/stripe/webhook"
    organization = make_org(credit_usd=None)
    make_org(credit_usd="7")  # another organisation: its own statement, untouched
    for payload in corpus(localstripe, "month", organization).events:
        assert deliver(url, payload) == 200
    today = datetime.now(UTC).date()
    after_the_month = datetime.combine(next_month(today), datetime.min.time(), UTC) + timedelta(
        hours=1
    )

    first = statements_issue_due(now=after_the_month, grace=GRACE)
    before = snapshot()
    BillingCursor.objects.all().delete()  # as if the first run died before moving the cursor
    second = statements_issue_due(now=after_the_month, grace=GRACE)

    assert snapshot() == before
    assert [s.pk for s in second] == [s.pk for s in first]
    statement = Statement.objects.get(organization=organization)
    figures = statement_figures(statement=statement)
    assert [(m.section, m.transactions, m.amount_usd) for m in figures.movements] == [
        ("topup", 1, Decimal(100)),
        ("refund", 2, Decimal(-50)),
        ("dispute_withdrawal", 1, Decimal(-30)),
        ("dispute_reinstatement", 1, Decimal(30)),
    ]
    moved = sum((m.amount_usd for m in figures.movements), Decimal(0))
    assert figures.opening_balance_usd == Decimal(0)
    assert figures.opening_balance_usd + moved == figures.closing_balance_usd
    assert figures.closing_balance_usd == wallet_balance_usd(organization_id=organization.pk)
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == []
