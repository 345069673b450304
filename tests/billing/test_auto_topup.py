"""Auto top-up against localstripe: triggered by spending below the threshold, at most one in
flight, credited by the signed webhook, switched off after repeated declines."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.conf import settings
from django.core import mail
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from billing.models import BillingProfile, CardPayment
from billing.payments import AutoTopUpTerms, PaymentError, auto_topup_charge, auto_topup_configure
from billing.selectors import wallet_balance_usd
from billing.tasks import start_auto_topups
from portal.models import Organization
from tests.billing.conftest import event
from tests.billing.stripe_helpers import (
    DECLINED_ON_CHARGE,
    GOOD_CARD,
    auto_topup_intents,
    deliver,
    save_card,
    wait_for,
)
from tests.factories import make_key, make_org
from tests.stripe_server import IdempotentStripe, LocalStripe


def configure(organization: Organization, *, threshold: str, amount: str) -> None:
    auto_topup_configure(
        organization=organization,
        terms=AutoTopUpTerms(
            enabled=True, threshold_usd=Decimal(threshold), amount_usd=Decimal(amount)
        ),
    )


def profile_of(organization: Organization) -> BillingProfile:
    return BillingProfile.objects.get(organization=organization)


def test_it_tops_up_once_when_spending_crosses_the_threshold(
    localstripe: LocalStripe, catalog: object, gateway_url: str
) -> None:
    organization = make_org(credit_usd="5")
    other = make_org(credit_usd="1")  # below its own threshold, but auto top-up is off
    save_card(localstripe, organization, GOOD_CARD)
    configure(organization, threshold="5", amount="20")
    assert start_auto_topups() == 0  # 5 is not below 5

    _, key = make_key(organization)
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)
    client.chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    spent_balance = wallet_balance_usd(organization_id=organization.pk)
    assert spent_balance < Decimal(5)

    assert start_auto_topups() == 1  # beat's run: charges the saved card off-session
    assert auto_topup_charge(organization_id=organization.pk) == "not due"  # one in flight
    wait_for(lambda: wallet_balance_usd(organization_id=organization.pk) == spent_balance + 20)
    payment = CardPayment.objects.get(organization=organization)
    assert (payment.origin, payment.status, payment.amount_usd) == ("auto_topup", "succeeded", 20)
    assert profile_of(organization).auto_topup_in_flight_since is None
    assert start_auto_topups() == 0  # above the threshold again
    assert wallet_balance_usd(organization_id=other.pk) == Decimal(1)


@override_settings(BILLING_AUTO_TOPUP_MAX_FAILURES=2)
def test_it_switches_off_after_repeated_declines_and_tells_the_owner(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    save_card(localstripe, organization, DECLINED_ON_CHARGE)
    configure(organization, threshold="5", amount="20")

    def failures() -> int:
        return profile_of(organization).auto_topup_failures

    def released() -> bool:
        return profile_of(organization).auto_topup_in_flight_since is None

    for attempt in (1, 2):
        assert auto_topup_charge(organization_id=organization.pk).startswith("declined")
        # Counted by the payment_failed webhook, which also releases the claim.
        wait_for(released)
        assert failures() == attempt
        assert profile_of(organization).auto_topup_in_flight_since is None

    assert profile_of(organization).auto_topup_enabled is False
    assert auto_topup_charge(organization_id=organization.pk) == "not due"
    assert len(mail.outbox) == 2
    assert mail.outbox[0].to == [organization.membership_set.get().user.email]
    assert "switched off" in mail.outbox[1].body
    assert "of 20.00" in mail.outbox[0].subject  # the declined intent's amount
    assert wallet_balance_usd(organization_id=organization.pk) == 0
    assert set(CardPayment.objects.values_list("status", flat=True)) == {"failed"}


def test_it_needs_a_saved_card_to_switch_on(localstripe: LocalStripe) -> None:
    organization = make_org()
    with pytest.raises(PaymentError, match="save a card"):
        configure(organization, threshold="5", amount="20")


def test_concurrent_runs_charge_one_top_up(localstripe: LocalStripe) -> None:
    organization = make_org(credit_usd=None)
    save_card(localstripe, organization, GOOD_CARD)
    configure(organization, threshold="5", amount="20")

    def charge(_: int) -> str:
        try:
            return auto_topup_charge(organization_id=organization.pk)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(charge, range(4)))
    assert sorted(outcome.split(" ")[0] for outcome in outcomes) == [
        "charged",
        "not",
        "not",
        "not",
    ]
    wait_for(lambda: wallet_balance_usd(organization_id=organization.pk) == 20)
    assert CardPayment.objects.filter(organization=organization).count() == 1


def test_stripe_out_of_reach_is_not_a_failed_card_and_the_retry_reuses_the_key(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    save_card(localstripe, organization, GOOD_CARD)
    configure(organization, threshold="5", amount="20")
    unreachable = "http://127.0.0.1:9"  # the discard port: connection refused

    with override_settings(STRIPE_API_BASE=unreachable):
        for _ in range(4):  # more runs than BILLING_AUTO_TOPUP_MAX_FAILURES
            assert auto_topup_charge(organization_id=organization.pk).startswith("waiting: ")

    profile = profile_of(organization)
    # The intent may exist in Stripe (only the answer was lost): the next run asks again with
    # the same idempotency key, so Stripe answers with that intent instead of charging twice.
    assert (profile.auto_topup_attempts, profile.auto_topup_in_flight_since) == (0, None)
    assert (profile.auto_topup_enabled, profile.auto_topup_failures) == (True, 0)
    assert mail.outbox == []  # no card failed
    assert auto_topup_charge(organization_id=organization.pk).startswith("charged ")
    wait_for(lambda: wallet_balance_usd(organization_id=organization.pk) == 20)
    assert profile_of(organization).auto_topup_attempts == 1


def expire_the_claim(organization: Organization) -> None:
    """As if the top-up in flight had had no answer for longer than the claim lasts."""
    long_ago = timezone.now() - timedelta(seconds=settings.BILLING_AUTO_TOPUP_STALE_SECONDS + 60)
    BillingProfile.objects.filter(organization=organization).update(
        auto_topup_in_flight_since=long_ago
    )


def test_a_stale_top_ups_late_success_is_credited_but_keeps_the_newer_ones_claim(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    other = make_org(credit_usd="3")
    save_card(localstripe, organization, GOOD_CARD)
    configure(organization, threshold="50", amount="20")  # one top-up does not reach 50
    localstripe.silence_webhooks()  # Stripe's answers come when the test delivers them
    assert auto_topup_charge(organization_id=organization.pk).startswith("charged ")
    expire_the_claim(organization)
    assert auto_topup_charge(organization_id=organization.pk).startswith("charged ")
    late, current = auto_topup_intents(localstripe, organization)

    outcome = deliver(event("evt_late_success", "payment_intent.succeeded", {"id": late}))

    assert outcome == "credited 20.0000000000 USD"  # money received is always credited
    assert wallet_balance_usd(organization_id=organization.pk) == 20
    assert profile_of(organization).auto_topup_in_flight_since is not None  # still the newer's
    assert auto_topup_charge(organization_id=organization.pk) == "not due"  # no third charge
    assert deliver(event("evt_current_success", "payment_intent.succeeded", {"id": current})) == (
        "credited 20.0000000000 USD"
    )
    assert profile_of(organization).auto_topup_in_flight_since is None
    assert len(auto_topup_intents(localstripe, organization)) == 2
    assert wallet_balance_usd(organization_id=other.pk) == 3


def test_a_stale_top_ups_late_failure_is_not_counted_against_the_newer_one(
    localstripe: LocalStripe,
) -> None:
    organization = make_org(credit_usd=None)
    save_card(localstripe, organization, DECLINED_ON_CHARGE)
    configure(organization, threshold="5", amount="20")
    localstripe.silence_webhooks()
    assert auto_topup_charge(organization_id=organization.pk).startswith("declined")
    expire_the_claim(organization)
    assert auto_topup_charge(organization_id=organization.pk).startswith("declined")
    late, current = auto_topup_intents(localstripe, organization)

    outcome = deliver(event("evt_late_failure", "payment_intent.payment_failed", {"id": late}))

    assert outcome == "marked failed"
    profile = profile_of(organization)
    assert profile.auto_topup_failures == 0
    assert profile.auto_topup_in_flight_since is not None  # the newer top-up's claim stands
    assert auto_topup_charge(organization_id=organization.pk) == "not due"
    deliver(event("evt_current_failure", "payment_intent.payment_failed", {"id": current}))
    profile = profile_of(organization)
    assert (profile.auto_topup_failures, profile.auto_topup_in_flight_since) == (1, None)


def test_a_retry_after_a_lost_answer_asks_for_what_the_lost_call_asked_for(
    idempotent_stripe: IdempotentStripe, localstripe: LocalStripe
) -> None:
    organization = make_org(credit_usd=None)
    other = make_org(credit_usd="3")
    save_card(localstripe, organization, GOOD_CARD)
    configure(organization, threshold="50", amount="20")
    localstripe.silence_webhooks()  # the lost intent's outcome is not known here yet
    idempotent_stripe.lose_next_answers(1)
    assert auto_topup_charge(organization_id=organization.pk).startswith("waiting: ")
    # Meanwhile the owner saves another card and asks for more each time.
    new_card = save_card(localstripe, organization, GOOD_CARD).auto_topup_payment_method_id
    configure(organization, threshold="50", amount="35")

    outcome = auto_topup_charge(organization_id=organization.pk)

    lost, retried = idempotent_stripe.payment_intent_creations()
    # Same key, same parameters: Stripe answers with the lost intent instead of refusing the
    # key (then the next attempt, under a new key, would have charged the card again).
    assert retried == lost
    (intent,) = auto_topup_intents(localstripe, organization)
    assert outcome == f"charged {intent} (succeeded)"
    assert CardPayment.objects.get(organization=organization).amount_usd == 20
    assert deliver(event("evt_lost_success", "payment_intent.succeeded", {"id": intent})) == (
        "credited 20.0000000000 USD"
    )
    # The next attempt is the owner's new terms, under a new key.
    assert auto_topup_charge(organization_id=organization.pk).startswith("charged ")
    following = idempotent_stripe.payment_intent_creations()[-1]
    assert following.idempotency_key != lost.idempotency_key
    assert {("amount", "3500"), ("payment_method", new_card)} <= set(following.params)
    assert wallet_balance_usd(organization_id=other.pk) == 3


@pytest.mark.parametrize(
    ("card", "event_type", "applied"),
    [
        (GOOD_CARD, "payment_intent.succeeded", "credited 20.0000000000 USD"),
        (DECLINED_ON_CHARGE, "payment_intent.payment_failed", "marked failed"),
    ],
)
def test_once_a_lost_attempts_outcome_arrives_the_next_run_makes_a_new_attempt(
    idempotent_stripe: IdempotentStripe,
    localstripe: LocalStripe,
    card: str,
    event_type: str,
    applied: str,
) -> None:
    organization = make_org(credit_usd=None)
    other = make_org(credit_usd="3")
    save_card(localstripe, organization, card)
    configure(organization, threshold="50", amount="20")  # one top-up does not reach 50
    localstripe.silence_webhooks()  # Stripe's events come when the test delivers them
    idempotent_stripe.lose_next_answers(1)
    assert auto_topup_charge(organization_id=organization.pk).startswith("waiting: ")
    (lost,) = auto_topup_intents(localstripe, organization)
    # The lost intent's event arrives while no claim is held.
    assert deliver(event("evt_lost", event_type, {"id": lost})) == applied

    auto_topup_charge(organization_id=organization.pk)

    # Asked again under the lost call's key, Stripe would answer with that finished intent (or
    # replay its decline) and send no event about it again: the claim would wait an hour.
    lost_call, following = idempotent_stripe.payment_intent_creations()
    assert following.idempotency_key != lost_call.idempotency_key
    assert auto_topup_intents(localstripe, organization)[0] == lost
    (current,) = auto_topup_intents(localstripe, organization)[1:]
    assert deliver(event("evt_current", event_type, {"id": current})) == applied
    profile = profile_of(organization)
    assert profile.auto_topup_in_flight_since is None
    assert profile.auto_topup_failures == (2 if card == DECLINED_ON_CHARGE else 0)
    assert wallet_balance_usd(organization_id=organization.pk) == (
        0 if card == DECLINED_ON_CHARGE else 40
    )
    assert wallet_balance_usd(organization_id=other.pk) == 3
