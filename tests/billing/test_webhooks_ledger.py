"""How each Stripe event moves the ledger, and what a negative wallet does to the keys."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import openai
import pytest
from django.core import mail
from django.utils import timezone

from billing.models import CardPayment, StripeEvent, StripeLedgerEntry
from billing.payments import stripe_event_process, stripe_event_record
from billing.selectors import wallet_balance_usd
from billing.tasks import retry_stripe_events
from portal.models import Organization
from tests.billing.conftest import event
from tests.factories import make_key, make_org


def deliver(payload: bytes) -> str:
    """Store and process an event as the webhook and its task do (task called directly)."""
    stored = stripe_event_record(event=json.loads(payload))
    assert stored is not None
    return stripe_event_process(event_id=stored.event_id)


def paid(organization: Organization, pi: str, cents: int = 10000) -> CardPayment:
    payment = CardPayment.objects.create(
        stripe_payment_intent_id=pi,
        organization=organization,
        amount_usd=Decimal(cents) / 100,
        origin=CardPayment.Origin.DASHBOARD,
    )
    intent = {"id": pi, "amount": cents, "amount_received": cents, "currency": "usd"}
    assert deliver(event(f"evt_{pi}_ok", "payment_intent.succeeded", intent)).startswith("credited")
    return payment


@pytest.mark.django_db
def test_cumulative_refunds_without_a_list_never_take_back_twice() -> None:
    organization = make_org(credit_usd=None)
    paid(organization, "pi_cum")
    charge = {"id": "ch_cum", "payment_intent": "pi_cum", "currency": "usd"}
    later = event("evt_cum_2", "charge.refunded", charge | {"amount_refunded": 5000})
    earlier = event("evt_cum_1", "charge.refunded", charge | {"amount_refunded": 2000})
    assert deliver(later) == "took back 50.0000000000 USD refunded"
    assert deliver(earlier) == "refund already taken back"
    assert deliver(later) == "refund already taken back"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(50)


@pytest.mark.django_db
def test_a_redelivered_success_credits_once() -> None:
    organization = make_org(credit_usd=None)
    paid(organization, "pi_twice")
    intent = {"id": "pi_twice", "amount": 10000, "amount_received": 10000, "currency": "usd"}
    assert deliver(event("evt_pi_twice_ok", "payment_intent.succeeded", intent)) == (
        "already credited"
    )
    assert deliver(event("evt_other_id", "payment_intent.succeeded", intent)) == (
        "already credited"
    )
    assert StripeLedgerEntry.objects.filter(organization=organization).count() == 1
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)


@pytest.mark.django_db
def test_a_failure_after_success_changes_nothing_and_a_failure_tells_the_owners(
    django_capture_on_commit_callbacks: Any,
) -> None:
    organization = make_org(credit_usd=None)
    paid(organization, "pi_late_fail")
    failed = {"id": "pi_late_fail", "last_payment_error": {"message": "Your card was declined."}}
    assert deliver(event("evt_late_fail", "payment_intent.payment_failed", failed)) == (
        "already succeeded"
    )
    CardPayment.objects.create(
        stripe_payment_intent_id="pi_fail",
        organization=organization,
        amount_usd=Decimal(10),
        origin=CardPayment.Origin.DASHBOARD,
    )
    failed = {"id": "pi_fail", "last_payment_error": {"message": "Your card was declined."}}
    with django_capture_on_commit_callbacks(execute=True):
        assert deliver(event("evt_fail", "payment_intent.payment_failed", failed)) == (
            "marked failed"
        )
        assert deliver(event("evt_fail_again", "payment_intent.payment_failed", failed)) == (
            "already failed"
        )
    assert CardPayment.objects.get(stripe_payment_intent_id="pi_fail").status == "failed"
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == [organization.membership_set.get().user.email]
    assert "Your card was declined." in mail.outbox[0].body
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)


@pytest.mark.django_db
def test_an_event_about_an_unknown_payment_waits_unprocessed() -> None:
    make_org()
    dispute = {"id": "dp_x", "payment_intent": "pi_nobody", "amount": 100}
    outcome = deliver(event("evt_dp_x", "charge.dispute.created", dispute))
    assert outcome.startswith("waiting")
    stored = StripeEvent.objects.get(event_id="evt_dp_x")
    assert stored.processed_at is None
    assert not StripeLedgerEntry.objects.exists()


@pytest.mark.django_db
def test_a_success_without_portal_metadata_is_ignored() -> None:
    make_org()
    intent = {"id": "pi_elsewhere", "amount": 500, "amount_received": 500, "currency": "usd"}
    assert deliver(event("evt_elsewhere", "payment_intent.succeeded", intent)).startswith("ignored")
    assert not StripeLedgerEntry.objects.exists()


def test_a_wallet_pushed_negative_by_a_dispute_stops_its_keys_until_topped_up(
    gateway_url: str, catalog: object
) -> None:
    organization = make_org(credit_usd=None)
    paid(organization, "pi_spent", cents=1000)
    _, key = make_key(organization)
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)

    def ask() -> None:
        client.chat.completions.create(
            model="fake-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )

    ask()  # $10 of credit: served
    dispute = {"id": "dp_neg", "payment_intent": "pi_spent", "amount": 1000}
    deliver(event("evt_dp_neg", "charge.dispute.funds_withdrawn", dispute))
    assert wallet_balance_usd(organization_id=organization.pk) < 0
    with pytest.raises(openai.APIStatusError) as caught:
        ask()
    assert caught.value.status_code == 402

    deliver(event("evt_dp_neg_won", "charge.dispute.funds_reinstated", dispute))
    assert wallet_balance_usd(organization_id=organization.pk) > 0
    ask()  # positive again: served


@pytest.mark.django_db
def test_a_waiting_event_is_applied_by_the_retry_once_its_payment_is_known() -> None:
    organization = make_org(credit_usd=None)
    dispute = {"id": "dp_early", "payment_intent": "pi_late", "amount": 3000}
    assert deliver(event("evt_dp_early", "charge.dispute.created", dispute)).startswith("waiting")
    paid(organization, "pi_late")
    StripeEvent.objects.filter(event_id="evt_dp_early").update(
        received_at=timezone.now() - timedelta(minutes=2)
    )
    assert retry_stripe_events() == 1
    assert StripeEvent.objects.get(event_id="evt_dp_early").outcome == "disputed amount taken back"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(70)
    assert retry_stripe_events() == 0
