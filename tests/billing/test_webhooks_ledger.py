"""How each Stripe event moves the ledger, what is re-fetched from Stripe (localstripe) before
money moves, and what a negative wallet does to the keys."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.core.mail import EmailMessage
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from billing.models import CardPayment, LedgerTransaction, StripeEvent, StripeLedgerEntry
from billing.selectors import wallet_balance_usd
from billing.services import card_money_post
from billing.tasks import retry_stripe_events
from portal.models import Organization
from tests.billing.conftest import event
from tests.billing.stripe_helpers import (
    DECLINED_ON_CHARGE,
    card_paid,
    charge_of,
    deliver,
    paid_in_currency,
    refund,
    refund_event_object,
    refund_status_set,
    wait_for,
)
from tests.factories import make_key, make_org
from tests.stripe_server import LocalStripe


def recorded_payment(organization: Organization, pi: str, cents: int = 10000) -> CardPayment:
    """A card payment as its `succeeded` event leaves it (for dispute tests: disputes are
    applied from their event, with no call to Stripe)."""
    with transaction.atomic():
        payment = CardPayment.objects.create(
            stripe_payment_intent_id=pi,
            organization=organization,
            amount_usd=Decimal(cents) / 100,
            origin=CardPayment.Origin.DASHBOARD,
            status=CardPayment.Status.SUCCEEDED,
        )
        card_money_post(
            organization_id=organization.pk,
            kind=LedgerTransaction.Kind.TOPUP,
            amount_usd=payment.amount_usd,
            memo=f"card payment {pi}",
        )
    return payment


def test_a_refund_event_takes_back_what_stripe_says_was_refunded_not_what_it_carries(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    make_org()  # another organisation, untouched
    payment = card_paid(localstripe, organization, cents=10000)
    charge_id = charge_of(localstripe, payment)
    first = refund(localstripe, charge_id, 2000)
    second = refund(localstripe, charge_id, 3000)
    stale = {
        "id": charge_id,
        "payment_intent": payment.stripe_payment_intent_id,
        "amount_refunded": 2000,
        "refunds": {"data": [{"id": first, "amount": 2000}], "has_more": False},
    }

    taken = deliver(event("evt_refund_stale", "charge.refunded", stale))
    again = deliver(event("evt_refund_lie", "charge.refunded", stale | {"amount_refunded": 9900}))

    assert taken == "took back 50.0000000000 USD refunded"
    assert again == "refunds already applied"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(50)
    assert sorted(
        StripeLedgerEntry.objects.filter(stripe_object_id=charge_id).values_list(
            "key", "amount_usd"
        )
    ) == sorted(
        [
            (f"{charge_id}:refund:{first}", Decimal(-20)),
            (f"{charge_id}:refund:{second}", Decimal(-30)),
        ]
    )


REFUND_FAILURE_EVENTS = ("refund.failed", "refund.updated", "charge.refund.updated")


def refund_entries(charge_id: str) -> list[tuple[str, Decimal]]:
    return sorted(
        StripeLedgerEntry.objects.filter(stripe_object_id=charge_id).values_list(
            "key", "amount_usd"
        )
    )


def test_a_refund_that_fails_gives_its_amount_back_once(localstripe: LocalStripe) -> None:
    organization = make_org(credit_usd=None)
    other = make_org(credit_usd="5")
    payment = card_paid(localstripe, organization, cents=10000)
    charge_id = charge_of(localstripe, payment)
    refund_id = refund(localstripe, charge_id, 3000)
    assert deliver(event("evt_rf_taken", "charge.refunded", {"id": charge_id})) == (
        "took back 30.0000000000 USD refunded"
    )
    refund_status_set(localstripe, refund_id, "failed")
    failed = refund_event_object(refund_id, charge_id)

    outcomes = [deliver(event(f"evt_rf_{kind}", kind, failed)) for kind in REFUND_FAILURE_EVENTS]
    outcomes.append(deliver(event("evt_rf_refund.failed", "refund.failed", failed)))  # again

    assert (
        outcomes
        == ["gave back 30.0000000000 USD of failed refunds"] + ["refunds already applied"] * 3
    )
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)
    assert refund_entries(charge_id) == [
        (f"{charge_id}:refund:{refund_id}", Decimal(-30)),
        (f"{charge_id}:refund:{refund_id}:failed", Decimal(30)),
    ]
    assert wallet_balance_usd(organization_id=other.pk) == Decimal(5)


def test_a_refund_that_failed_before_any_of_its_events_was_applied_takes_nothing(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    payment = card_paid(localstripe, organization, cents=10000)
    charge_id = charge_of(localstripe, payment)
    kept = refund(localstripe, charge_id, 2000)
    refund_id = refund(localstripe, charge_id, 3000)
    refund_status_set(localstripe, refund_id, "failed")
    failed = refund_event_object(refund_id, charge_id)

    first = deliver(event("evt_rf_early", "refund.failed", failed))
    late = deliver(event("evt_rf_late_refunded", "charge.refunded", {"id": charge_id}))

    # Recorded as made and returned, so that no older view of it as succeeded can take it.
    assert first == (
        "took back 50.0000000000 USD refunded, gave back 30.0000000000 USD of failed refunds"
    )
    assert late == "refunds already applied"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(80)
    assert refund_entries(charge_id) == sorted(
        [
            (f"{charge_id}:refund:{kept}", Decimal(-20)),
            (f"{charge_id}:refund:{refund_id}", Decimal(-30)),
            (f"{charge_id}:refund:{refund_id}:failed", Decimal(30)),
        ]
    )


def test_a_view_of_the_charge_older_than_its_refunds_failure_takes_nothing_back(
    localstripe: LocalStripe,
) -> None:
    """A charge fetched before its refund failed may be applied after the failure (two workers,
    the older fetch committing last): the failed refund stays given back."""
    organization = make_org(credit_usd=None)
    payment = card_paid(localstripe, organization, cents=10000)
    charge_id = charge_of(localstripe, payment)
    refund_id = refund(localstripe, charge_id, 3000)
    refund_status_set(localstripe, refund_id, "failed")
    failed = refund_event_object(refund_id, charge_id)
    deliver(event("evt_rf_failed_first", "refund.failed", failed))

    refund_status_set(localstripe, refund_id, "succeeded")  # what the older fetch saw
    outcome = deliver(event("evt_rf_older_view", "charge.refunded", {"id": charge_id}))

    assert outcome == "refunds already applied"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)


def test_a_failed_refund_taken_back_by_its_charges_total_is_given_back_once(
    localstripe: LocalStripe,
) -> None:
    """Earlier versions took back a charge's `amount_refunded` under one key per total when an
    event did not list its refunds; a refund so taken is given back like any other."""
    organization = make_org(credit_usd=None)
    payment = card_paid(localstripe, organization, cents=10000)
    charge_id = charge_of(localstripe, payment)
    refund_id = refund(localstripe, charge_id, 3000)
    with transaction.atomic():
        taken = card_money_post(
            organization_id=organization.pk,
            kind=LedgerTransaction.Kind.REFUND,
            amount_usd=Decimal(30),
            memo=f"refund of card payment {payment.stripe_payment_intent_id}",
        )
        StripeLedgerEntry.objects.create(
            key=f"{charge_id}:refunded-to:3000",
            organization=organization,
            stripe_object_id=charge_id,
            amount_usd=Decimal(-30),
            ledger_transaction=taken,
        )
    assert deliver(event("evt_rf_total", "charge.refunded", {"id": charge_id})) == (
        "refunds already applied"
    )
    refund_status_set(localstripe, refund_id, "failed")

    failed = refund_event_object(refund_id, charge_id)
    outcomes = [deliver(event(f"evt_rf_t_{kind}", kind, failed)) for kind in REFUND_FAILURE_EVENTS]

    assert outcomes[0] == "gave back 30.0000000000 USD of failed refunds"
    assert outcomes[1:] == ["refunds already applied"] * 2
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)
    assert refund_entries(charge_id) == [
        (f"{charge_id}:refund:{refund_id}:failed", Decimal(30)),
        (f"{charge_id}:refunded-to:3000", Decimal(-30)),
    ]


def test_a_redelivered_success_credits_once(localstripe: LocalStripe) -> None:
    organization = make_org(credit_usd=None)
    payment = card_paid(localstripe, organization, cents=10000)  # credited by localstripe's event
    intent = {"id": payment.stripe_payment_intent_id}

    assert deliver(event("evt_success_again", "payment_intent.succeeded", intent)) == (
        "already credited"
    )
    assert StripeLedgerEntry.objects.filter(organization=organization).count() == 1
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)


def test_a_success_event_for_a_payment_stripe_declined_credits_nothing(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    payment = card_paid(localstripe, organization, cents=1000, number=DECLINED_ON_CHARGE)
    forged = {
        "id": payment.stripe_payment_intent_id,
        "status": "succeeded",
        "amount": 1000,
        "amount_received": 1000,
        "currency": "usd",
        "metadata": {"organization_id": str(organization.pk), "switchboard_origin": "dashboard"},
    }

    outcome = deliver(event("evt_not_really", "payment_intent.succeeded", forged))

    assert outcome == "ignored: Stripe says the payment is requires_payment_method"
    assert payment.status == CardPayment.Status.FAILED
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(0)


def test_a_failure_event_for_a_payment_that_succeeded_changes_nothing(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    payment = card_paid(localstripe, organization, cents=10000)
    failed = {
        "id": payment.stripe_payment_intent_id,
        "last_payment_error": {"message": "Your card was declined."},
    }

    outcome = deliver(event("evt_late_fail", "payment_intent.payment_failed", failed))

    assert outcome == "not failed: Stripe says the payment is succeeded"
    payment.refresh_from_db()
    assert payment.status == CardPayment.Status.SUCCEEDED
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)


def test_a_declined_payment_tells_the_owners_once(
    localstripe: LocalStripe, mailoutbox: list[EmailMessage]
) -> None:
    organization = make_org(credit_usd=None)
    make_org()  # another organisation's owner gets nothing
    payment = card_paid(localstripe, organization, cents=1000, number=DECLINED_ON_CHARGE)
    wait_for(lambda: len(mailoutbox) == 1)

    redelivered = deliver(
        event(
            "evt_fail_redelivered",
            "payment_intent.payment_failed",
            {"id": payment.stripe_payment_intent_id},
        )
    )

    assert redelivered == "already failed"
    [message] = mailoutbox
    assert message.to == [organization.membership_set.get().user.email]
    assert "of 10.00" in message.subject  # the intent's amount
    assert "Your card was declined." in message.body


def test_an_event_about_an_object_stripe_does_not_have_is_ignored(
    localstripe: LocalStripe,
) -> None:
    make_org()

    outcome = deliver(event("evt_nobody", "payment_intent.succeeded", {"id": "pi_nobody"}))

    assert outcome == "ignored: Stripe has no such object"
    assert StripeEvent.objects.get(event_id="evt_nobody").processed_at is not None
    assert not StripeLedgerEntry.objects.exists()


@pytest.mark.django_db
def test_an_event_waits_unprocessed_while_stripe_cannot_be_reached() -> None:
    make_org()
    unreachable = "http://127.0.0.1:9"  # the discard port: connection refused
    with override_settings(STRIPE_SECRET_KEY="sk_test_down", STRIPE_API_BASE=unreachable):
        outcome = deliver(event("evt_down", "payment_intent.succeeded", {"id": "pi_down"}))

    assert outcome.startswith("waiting: ")
    assert StripeEvent.objects.get(event_id="evt_down").processed_at is None


@pytest.mark.django_db
def test_an_event_about_an_unknown_payment_waits_unprocessed() -> None:
    make_org()
    dispute = {"id": "dp_x", "payment_intent": "pi_nobody", "amount": 100, "currency": "usd"}
    outcome = deliver(event("evt_dp_x", "charge.dispute.created", dispute))
    assert outcome.startswith("waiting")
    stored = StripeEvent.objects.get(event_id="evt_dp_x")
    assert stored.processed_at is None
    assert not StripeLedgerEntry.objects.exists()


def test_a_wallet_pushed_negative_by_a_dispute_stops_its_keys_until_topped_up(
    gateway_url: str, catalog: object
) -> None:
    organization = make_org(credit_usd=None)
    recorded_payment(organization, "pi_spent", cents=1000)
    _, key = make_key(organization)
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)

    def ask() -> None:
        client.chat.completions.create(
            model="fake-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )

    ask()  # $10 of credit: served
    dispute = {"id": "dp_neg", "payment_intent": "pi_spent", "amount": 1000, "currency": "usd"}
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
    dispute = {"id": "dp_early", "payment_intent": "pi_late", "amount": 3000, "currency": "usd"}
    assert deliver(event("evt_dp_early", "charge.dispute.created", dispute)).startswith("waiting")
    recorded_payment(organization, "pi_late")
    StripeEvent.objects.filter(event_id="evt_dp_early").update(
        received_at=timezone.now() - timedelta(minutes=2)
    )
    assert retry_stripe_events() == 1
    assert StripeEvent.objects.get(event_id="evt_dp_early").outcome == "disputed amount taken back"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(70)
    assert retry_stripe_events() == 0


def test_a_refund_of_a_payment_in_another_currency_takes_nothing_back(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd="50")
    make_org()  # another organisation, untouched
    pi, charge_id = paid_in_currency(localstripe, organization, cents=3000, currency="eur")
    assert deliver(event("evt_eur_paid", "payment_intent.succeeded", {"id": pi})) == (
        "ignored: currency 'eur' is not usd"
    )
    refund(localstripe, charge_id, 3000)

    outcome = deliver(
        event("evt_eur_refund", "charge.refunded", {"id": charge_id, "payment_intent": pi})
    )

    assert outcome == "ignored: currency 'eur' is not usd"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(50)
    assert not StripeLedgerEntry.objects.exists()


@pytest.mark.django_db
def test_a_dispute_in_another_currency_takes_nothing_back() -> None:
    organization = make_org(credit_usd=None)
    recorded_payment(organization, "pi_eur_dispute")
    dispute = {"id": "dp_eur", "payment_intent": "pi_eur_dispute", "amount": 3000}

    outcome = deliver(event("evt_dp_eur", "charge.dispute.created", dispute | {"currency": "eur"}))

    assert outcome == "ignored: currency 'eur' is not usd"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)


@pytest.mark.django_db
def test_an_inquiry_takes_nothing_back_until_stripe_withdraws_its_funds() -> None:
    organization = make_org(credit_usd=None)
    recorded_payment(organization, "pi_inquired")
    dispute = {"id": "dp_inq", "payment_intent": "pi_inquired", "amount": 3000, "currency": "usd"}

    inquiry = dispute | {"status": "warning_needs_response"}
    outcome = deliver(event("evt_dp_inq", "charge.dispute.created", inquiry))

    assert outcome == "ignored: an inquiry withdraws no funds"
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(100)
    escalated = dispute | {"status": "needs_response"}
    assert deliver(event("evt_dp_inq_2", "charge.dispute.funds_withdrawn", escalated)) == (
        "disputed amount taken back"
    )
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(70)
