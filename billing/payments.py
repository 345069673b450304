"""Card payments: services for the Stripe customer, top-ups, webhook events and auto top-up.

Credit moves only here, and only from a verified webhook event (`payment_intent.succeeded`),
never from the browser's return. Every money movement is a `StripeLedgerEntry` whose unique
key names the movement itself, so redelivered, concurrent or out-of-order events apply it once.
An event about a payment or a refund is only a trigger: its PaymentIntent, or the Charge with all
its refunds, is re-fetched from Stripe before money moves (`_REFETCH`); disputes are applied from
the event.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing import stripe_api
from billing.alerts import alert_payment_failed
from billing.models import (
    Account,
    BillingProfile,
    CardPayment,
    LedgerTransaction,
    StripeEvent,
    StripeLedgerEntry,
)
from billing.money import (
    ZERO_USD,
    MoneyError,
    cents_from_usd,
    format_usd,
    parse_usd,
    usd_field,
    usd_from_cents,
)
from billing.services import CARD_MONEY_KINDS, BillingError, card_money_post
from portal.models import Membership, Organization, User
from portal.permissions import Action, can

logger = logging.getLogger(__name__)

# Events about one refund whose status changed (to failed or canceled, say): their object is
# the Refund. `charge.refund.updated` is sent for some payment methods only; `refund.updated`
# for all.
_REFUND_EVENT_TYPES = ("refund.failed", "refund.updated", "charge.refund.updated")

HANDLED_EVENT_TYPES = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "charge.refunded",
        *_REFUND_EVENT_TYPES,
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)


class PaymentError(BillingError):
    """A payment that cannot be made; the message is safe to show the member."""


class PaymentNotKnownYet(Exception):
    """A refund or dispute of a PaymentIntent this portal has no row for (yet)."""


def membership_may_pay(*, membership: Membership) -> bool:
    """Whether the member may pay for credit and change auto top-up (portal.permissions)."""
    return can(membership, Action.BILLING_MANAGE)


def billing_profile_get_or_create(*, organization_id: int) -> BillingProfile:
    profile, _ = BillingProfile.objects.get_or_create(organization_id=organization_id)
    return profile


def stripe_customer_ensure(*, organization: Organization) -> str:
    """The organisation's Stripe Customer id, created on first use.

    The idempotency key is fixed per organisation, so concurrent first uses get the same
    Customer back from Stripe; the conditional UPDATE stores the first answer only.
    """
    profile = billing_profile_get_or_create(organization_id=organization.pk)
    if profile.stripe_customer_id:
        return profile.stripe_customer_id
    customer_id = stripe_api.customer_create(
        organization_id=organization.pk,
        name=organization.name,
        idempotency_key=f"customer-org-{organization.pk}-{organization.created_at:%Y%m%d%H%M%S%f}",
    )
    BillingProfile.objects.filter(pk=profile.pk, stripe_customer_id__isnull=True).update(
        stripe_customer_id=customer_id
    )
    profile.refresh_from_db(fields=["stripe_customer_id"])
    assert profile.stripe_customer_id is not None  # noqa: S101 - set just above
    return profile.stripe_customer_id


@dataclass(frozen=True, slots=True)
class StartedTopUp:
    payment: CardPayment
    client_secret: str
    status: str  # the PaymentIntent's: succeeded, processing, requires_action, ...


def topup_amount_parse(raw: str) -> Decimal:
    """A top-up amount typed or picked on the page: whole cents within the configured bounds."""
    try:
        # parse_usd first: it refuses non-finite and out-of-range amounts, which
        # cents_from_usd would turn into an int of up to a million digits (seconds of CPU).
        amount_usd = parse_usd(raw)
        cents_from_usd(amount_usd)
    except MoneyError:
        raise PaymentError("enter an amount in dollars and cents, e.g. 25 or 12.50") from None
    low, high = settings.BILLING_TOPUP_MIN_USD, settings.BILLING_TOPUP_MAX_USD
    if not low <= amount_usd <= high:
        raise PaymentError(f"the amount must be between {low} and {high} USD")
    return amount_usd


def card_setup_start(*, organization: Organization) -> str:
    """A SetupIntent's client secret: the page collects the card into it with Stripe.js."""
    customer_id = stripe_customer_ensure(organization=organization)
    try:
        intent = stripe_api.setup_intent_create(
            customer_id=customer_id,
            idempotency_key=f"setup-{organization.pk}-{new_request_token()}",
        )
    except stripe_api.StripeCallFailed as error:
        raise PaymentError(str(error)) from None
    return intent.client_secret


def topup_start(
    *,
    organization: Organization,
    user: User,
    amount_usd: Decimal,
    setup_intent_id: str,
    request_token: str,
) -> StartedTopUp:
    """Charge the card the page just collected (a succeeded SetupIntent of this organisation's
    Customer, re-fetched from Stripe) with a PaymentIntent, and record it as pending.

    No credit here: only the `payment_intent.succeeded` webhook grants it. `request_token`
    comes from the page, so a double submit gets the same PaymentIntent back from Stripe.
    """
    customer_id = stripe_customer_ensure(organization=organization)
    try:
        card = stripe_api.setup_intent_saved_card(
            setup_intent_id=setup_intent_id, customer_id=customer_id
        )
        intent = stripe_api.payment_intent_create(
            customer_id=customer_id,
            amount_cents=cents_from_usd(amount_usd),
            organization_id=organization.pk,
            origin=CardPayment.Origin.DASHBOARD,
            idempotency_key=f"topup-{organization.pk}-{request_token}",
            payment_method_id=card.payment_method_id,
        )
    except stripe_api.StripeCallFailed as error:
        raise PaymentError(str(error)) from None
    payment, _ = CardPayment.objects.get_or_create(
        stripe_payment_intent_id=intent.id,
        defaults={
            "organization": organization,
            "amount_usd": amount_usd,
            "origin": CardPayment.Origin.DASHBOARD,
            "created_by": user,
        },
    )
    return StartedTopUp(payment=payment, client_secret=intent.client_secret, status=intent.status)


def new_request_token() -> str:
    return uuid.uuid4().hex


# Webhook events


def stripe_event_record(*, event: dict[str, Any]) -> StripeEvent | None:
    """Store a verified event once by its id; None for a type this portal does not handle.

    Returns the stored row (the first delivery's, on a redelivery).
    """
    if event.get("type") not in HANDLED_EVENT_TYPES:
        return None
    try:
        with transaction.atomic():
            return StripeEvent.objects.create(
                event_id=str(event["id"]), type=str(event["type"]), payload=event
            )
    except IntegrityError:
        return StripeEvent.objects.get(event_id=str(event["id"]))


def stripe_event_process(*, event_id: str) -> str:
    """Apply a stored event to the ledger and the payment; returns and records the outcome.

    Idempotent: every movement goes through a unique `StripeLedgerEntry` key and every status
    change is conditional, so running it again, or concurrently, changes nothing more.
    """
    event = StripeEvent.objects.get(event_id=event_id)
    handler = _HANDLERS[event.type]
    sent = event.payload["data"]["object"]
    fetch = _REFETCH.get(event.type)
    try:
        # Outside the transaction: no row lock is held across a call to Stripe. A snapshot
        # older than one already applied does no harm: every movement is keyed and refunds
        # take back only what is missing.
        current = sent if fetch is None else fetch(str(sent["id"]))
    except stripe_api.StripeObjectMissing:
        outcome = "ignored: Stripe has no such object"
        StripeEvent.objects.filter(pk=event.pk).update(processed_at=timezone.now(), outcome=outcome)
        return outcome
    except (stripe_api.StripeCallFailed, stripe_api.StripeNotConfigured) as error:
        # Left unprocessed: beat's retry (or a redelivery) fetches again later.
        StripeEvent.objects.filter(pk=event.pk).update(outcome=f"waiting: {error}"[:300])
        logger.warning("stripe event %s (%s) waits for Stripe: %s", event_id, event.type, error)
        return f"waiting: {error}"
    try:
        with transaction.atomic():
            outcome = handler(current)
            StripeEvent.objects.filter(pk=event.pk).update(
                processed_at=timezone.now(), outcome=outcome[:300]
            )
    except PaymentNotKnownYet as waiting:
        # Left unprocessed: a redelivery (or a later run) applies it once the payment is known.
        StripeEvent.objects.filter(pk=event.pk).update(outcome=f"waiting: {waiting}"[:300])
        logger.info("stripe event %s (%s) waits: %s", event.event_id, event.type, waiting)
        return f"waiting: {waiting}"
    logger.info("stripe event %s (%s): %s", event.event_id, event.type, outcome)
    return outcome


def stripe_events_unprocessed(*, older_than: timedelta) -> list[str]:
    """Ids of stored events not applied yet: a task lost before it ran, or an event that
    waits for its payment (beat retries them)."""
    now = timezone.now()
    # Stripe itself stops retrying after three days; an event still waiting then is not ours.
    return list(
        StripeEvent.objects.filter(
            processed_at__isnull=True,
            received_at__lt=now - older_than,
            received_at__gt=now - timedelta(days=3),
        )
        .order_by("received_at")
        .values_list("event_id", flat=True)[:500]
    )


def _payment_locked(
    *, payment_intent_id: str | None, metadata: dict[str, Any]
) -> CardPayment | None:
    """The portal's payment for a PaymentIntent, row-locked so that events about one payment
    are applied one at a time. Recorded from the intent's metadata if its creator has not
    written it yet (an off-session charge's webhook can beat the create call's return)."""
    if not payment_intent_id:
        return None
    organization_id = str(metadata.get("organization_id", ""))
    origin = str(metadata.get("switchboard_origin", ""))
    if (
        organization_id.isdigit()
        and origin in CardPayment.Origin.values
        and Organization.objects.filter(pk=int(organization_id)).exists()
    ):
        try:
            with transaction.atomic():
                CardPayment.objects.get_or_create(
                    stripe_payment_intent_id=payment_intent_id,
                    defaults={
                        "organization_id": int(organization_id),
                        "amount_usd": ZERO_USD,  # filled from the event when it succeeds
                        "origin": origin,
                    },
                )
        except IntegrityError:
            pass  # a concurrent creator won; the row exists
    return (
        CardPayment.objects.select_for_update()
        .filter(stripe_payment_intent_id=payment_intent_id)
        .first()
    )


def _ledger_entry_apply(
    *,
    key: str,
    payment: CardPayment,
    stripe_object_id: str,
    kind: LedgerTransaction.Kind,
    amount_usd: Decimal,
    memo: str,
) -> bool:
    """Post one Stripe movement of `amount_usd` (positive; `kind` gives the direction) unless
    its key was already applied; True if posted now."""
    if StripeLedgerEntry.objects.filter(key=key).exists():
        return False
    try:
        with transaction.atomic():
            entry = card_money_post(
                organization_id=payment.organization_id, kind=kind, amount_usd=amount_usd, memo=memo
            )
            StripeLedgerEntry.objects.create(
                key=key,
                organization_id=payment.organization_id,
                stripe_object_id=stripe_object_id,
                amount_usd=amount_usd * CARD_MONEY_KINDS[kind],
                ledger_transaction=entry,
            )
    except IntegrityError:
        return False  # a concurrent worker applied it; the savepoint undid our postings
    return True


def _not_usd(stripe_object: dict[str, Any]) -> str | None:
    """Why a payment, charge or dispute moves no money here: wallets hold USD, so an object in
    another currency was never credited and is never taken back (its cents are not cents of a
    dollar); None for a USD one."""
    currency = stripe_object.get("currency")
    return None if currency == "usd" else f"ignored: currency {currency!r} is not usd"


def _on_payment_succeeded(intent: dict[str, Any]) -> str:
    payment = _payment_locked(
        payment_intent_id=intent.get("id"), metadata=intent.get("metadata") or {}
    )
    if payment is None:
        return "ignored: not a payment made through this portal"
    if intent.get("status") != "succeeded":
        return f"ignored: Stripe says the payment is {intent.get('status')}"
    if ignored := _not_usd(intent):
        return ignored
    amount_usd = usd_from_cents(int(intent.get("amount_received") or intent["amount"]))
    posted = _ledger_entry_apply(
        key=f"{payment.stripe_payment_intent_id}:credit",
        payment=payment,
        stripe_object_id=payment.stripe_payment_intent_id,
        kind=LedgerTransaction.Kind.TOPUP,
        amount_usd=amount_usd,
        memo=f"card payment {payment.stripe_payment_intent_id}",
    )
    CardPayment.objects.filter(pk=payment.pk).update(
        status=CardPayment.Status.SUCCEEDED,
        amount_usd=amount_usd,
        failure_message="",
        updated_at=timezone.now(),
    )
    if payment.origin == CardPayment.Origin.AUTO_TOPUP:
        attempt = _auto_topup_attempt(intent)
        _auto_topup_given_back_answered(organization_id=payment.organization_id, attempt=attempt)
        _auto_topup_latest(organization_id=payment.organization_id, attempt=attempt).update(
            auto_topup_in_flight_since=None, auto_topup_failures=0
        )
    return f"credited {format_usd(amount_usd)} USD" if posted else "already credited"


# A PaymentIntent in one of these states has not failed, whatever an older event said (its
# `succeeded` event credits it, or a later event tells its outcome).
_NOT_FAILED = frozenset({"succeeded", "processing", "requires_capture"})


def _on_payment_failed(intent: dict[str, Any]) -> str:
    payment = _payment_locked(
        payment_intent_id=intent.get("id"), metadata=intent.get("metadata") or {}
    )
    if payment is None:
        return "ignored: not a payment made through this portal"
    if intent.get("status") in _NOT_FAILED:
        return f"not failed: Stripe says the payment is {intent.get('status')}"
    message = str(
        (intent.get("last_payment_error") or {}).get("message") or "the card was declined"
    )
    # A failed attempt can be followed by a successful one, never the reverse: only a pending
    # payment becomes failed, and only that transition counts as a failure.
    failed_now = CardPayment.objects.filter(
        pk=payment.pk, status=CardPayment.Status.PENDING
    ).update(
        status=CardPayment.Status.FAILED, failure_message=message[:300], updated_at=timezone.now()
    )
    if not failed_now:
        return f"already {payment.status}"
    # A row recorded from the intent's metadata (its creator's call was declined) has no
    # amount yet: the intent's is the one that failed.
    amount_usd = payment.amount_usd or usd_from_cents(int(intent.get("amount") or 0))
    if payment.origin == CardPayment.Origin.AUTO_TOPUP:
        attempt = _auto_topup_attempt(intent)
        _auto_topup_given_back_answered(organization_id=payment.organization_id, attempt=attempt)
        _auto_topup_failure_record(
            organization_id=payment.organization_id,
            attempt=attempt,
            amount_usd=amount_usd,
            message=message,
        )
    else:
        _payment_failed_notify(
            organization_id=payment.organization_id, amount_usd=amount_usd, reason=message
        )
    return "marked failed"


# A refund in one of these states has the money on its way back to the card (Stripe took it
# from our balance): the wallet gives it up. One that failed or was canceled returned it to
# our Stripe balance; one that `requires_action` has moved nothing yet.
_REFUND_LIVE = frozenset({"pending", "succeeded"})
_REFUND_RETURNED = frozenset({"failed", "canceled"})


def _on_charge_refunds(charge: dict[str, Any]) -> str:
    """Make the wallet give up exactly what the charge's refunds still hold: take back each
    refund that is pending or succeeded, and give back each one that then failed or was
    canceled (a correction posting: the refund's own entry stays).

    `charge` is re-fetched with every refund listed (`_REFETCH`), whichever event named it,
    and its refunds are settled together under the payment's row lock. Each refund is taken at
    most once (`<ch>:refund:<re>`) and given back at most once (`<ch>:refund:<re>:failed`),
    so repeated and reordered events move nothing more; and a refund seen failed before it was
    ever taken is recorded as taken and given back, so that a view of the charge fetched before
    the failure and applied after it cannot take it. Amounts are capped by totals, not read
    per refund, so that entries earlier versions wrote under the cumulative key
    `<ch>:refunded-to:<cents>` (when an event did not list its refunds) count once: the wallet
    ends holding back exactly the pending and succeeded refunds' total.
    """
    payment = _payment_locked(
        payment_intent_id=charge.get("payment_intent"), metadata=charge.get("metadata") or {}
    )
    if payment is None:
        raise PaymentNotKnownYet(f"no payment for {charge.get('payment_intent')}")
    if ignored := _not_usd(charge):
        return ignored
    charge_id = str(charge["id"])
    applied = dict(
        StripeLedgerEntry.objects.filter(
            stripe_object_id=charge_id, key__startswith=f"{charge_id}:refund"
        ).values_list("key", "amount_usd")
    )
    held_usd = -sum(applied.values(), ZERO_USD)  # USD the wallet gave up for this charge
    refunds = sorted(charge["refunds"]["data"], key=lambda refund: str(refund["id"]))

    def given_back(refund: dict[str, Any]) -> bool:
        # Then it failed, whatever an older view of the charge says.
        return f"{_refund_key(charge_id, refund)}:failed" in applied

    returned = [r for r in refunds if r.get("status") in _REFUND_RETURNED or given_back(r)]
    live = [r for r in refunds if r.get("status") in _REFUND_LIVE and not given_back(r)]
    live_usd = sum((_refund_usd(refund) for refund in live), ZERO_USD)
    kept_usd = sum(
        (_refund_usd(refund) for refund in live if _refund_key(charge_id, refund) in applied),
        ZERO_USD,
    )
    took_usd = gave_usd = ZERO_USD

    def post(key: str, kind: LedgerTransaction.Kind, amount_usd: Decimal, memo: str) -> Decimal:
        posted = _ledger_entry_apply(
            key=key,
            payment=payment,
            stripe_object_id=charge_id,
            kind=kind,
            amount_usd=amount_usd,
            memo=f"{memo} of card payment {payment.stripe_payment_intent_id}",
        )
        return amount_usd if posted else ZERO_USD

    for refund in returned:
        taken_key = _refund_key(charge_id, refund)
        if given_back(refund):
            continue
        # What the wallet holds back beyond the live refunds it has taken is this refund's.
        amount_usd = min(_refund_usd(refund), held_usd - kept_usd)
        if amount_usd <= ZERO_USD and taken_key not in applied:
            amount_usd = _refund_usd(refund)
            took = post(taken_key, LedgerTransaction.Kind.REFUND, amount_usd, "refund")
            took_usd, held_usd = took_usd + took, held_usd + took
        if amount_usd > ZERO_USD:
            gave = post(
                f"{taken_key}:failed",
                LedgerTransaction.Kind.REFUND_FAILED,
                amount_usd,
                f"failed refund {refund['id']}",
            )
            gave_usd, held_usd = gave_usd + gave, held_usd - gave
    for refund in live:
        taken_key = _refund_key(charge_id, refund)
        if taken_key in applied:
            continue
        amount_usd = min(_refund_usd(refund), live_usd - held_usd)
        if amount_usd > ZERO_USD:
            took = post(taken_key, LedgerTransaction.Kind.REFUND, amount_usd, "refund")
            took_usd, held_usd = took_usd + took, held_usd + took
    moved = [f"took back {format_usd(took_usd)} USD refunded"] if took_usd else []
    moved += [f"gave back {format_usd(gave_usd)} USD of failed refunds"] if gave_usd else []
    return ", ".join(moved) or "refunds already applied"


def _refund_key(charge_id: str, refund: dict[str, Any]) -> str:
    return f"{charge_id}:refund:{refund['id']}"


def _refund_usd(refund: dict[str, Any]) -> Decimal:
    return usd_from_cents(int(refund["amount"]))


def _dispute_payment(dispute: dict[str, Any]) -> CardPayment | None:
    return _payment_locked(
        payment_intent_id=dispute.get("payment_intent"), metadata=dispute.get("metadata") or {}
    )


def _dispute_withdraw(payment: CardPayment, dispute: dict[str, Any]) -> bool:
    return _ledger_entry_apply(
        key=f"{dispute['id']}:withdrawn",
        payment=payment,
        stripe_object_id=str(dispute["id"]),
        kind=LedgerTransaction.Kind.DISPUTE_WITHDRAWAL,
        amount_usd=usd_from_cents(int(dispute["amount"])),
        memo=f"dispute {dispute['id']} on card payment {payment.stripe_payment_intent_id}",
    )


def _on_dispute_withdrawn(dispute: dict[str, Any]) -> str:
    """`created` and `funds_withdrawn` are the same movement: the disputed amount leaves the
    wallet while the dispute is open (Stripe withdraws it from us at once). An inquiry
    (`warning_*` status) withdraws nothing and, closed, gives nothing back; should it become
    a chargeback, its `funds_withdrawn` event takes the amount then."""
    payment = _dispute_payment(dispute)
    if payment is None:
        raise PaymentNotKnownYet(f"no payment for {dispute.get('payment_intent')}")
    if ignored := _not_usd(dispute):
        return ignored
    if str(dispute.get("status", "")).startswith("warning_"):
        return "ignored: an inquiry withdraws no funds"
    return (
        "disputed amount taken back"
        if _dispute_withdraw(payment, dispute)
        else "already taken back"
    )


def _on_dispute_reinstated(dispute: dict[str, Any]) -> str:
    """A won dispute gives the amount back. A reinstatement implies the withdrawal, which is
    applied first if its event has not been processed yet (then that event changes nothing)."""
    payment = _dispute_payment(dispute)
    if payment is None:
        raise PaymentNotKnownYet(f"no payment for {dispute.get('payment_intent')}")
    if ignored := _not_usd(dispute):
        return ignored
    _dispute_withdraw(payment, dispute)
    posted = _ledger_entry_apply(
        key=f"{dispute['id']}:reinstated",
        payment=payment,
        stripe_object_id=str(dispute["id"]),
        kind=LedgerTransaction.Kind.DISPUTE_REINSTATEMENT,
        amount_usd=usd_from_cents(int(dispute["amount"])),
        memo=f"dispute {dispute['id']} won: card payment {payment.stripe_payment_intent_id}",
    )
    return "dispute funds reinstated" if posted else "already reinstated"


# Events whose object is re-fetched from Stripe before any money moves (STYLE.md rule 13): the
# signed payload says only that something happened to it. Disputes are applied from the
# payload: their amount does not change after creation, each movement is keyed by the dispute
# id and its kind of event, and localstripe, which the tests run against, has no disputes to
# fetch (in production `/v1/disputes/<id>` could be added here, with tests against a server
# that has them).
_REFETCH: dict[str, Callable[[str], dict[str, Any]]] = {
    "payment_intent.succeeded": lambda pi: stripe_api.payment_intent_fetch(payment_intent_id=pi),
    "payment_intent.payment_failed": lambda pi: stripe_api.payment_intent_fetch(
        payment_intent_id=pi
    ),
    "charge.refunded": lambda ch: stripe_api.charge_with_refunds_fetch(charge_id=ch),
    **dict.fromkeys(
        _REFUND_EVENT_TYPES, lambda re: stripe_api.charge_of_refund_fetch(refund_id=re)
    ),
}

_HANDLERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "payment_intent.succeeded": _on_payment_succeeded,
    "payment_intent.payment_failed": _on_payment_failed,
    "charge.refunded": _on_charge_refunds,
    **dict.fromkeys(_REFUND_EVENT_TYPES, _on_charge_refunds),
    "charge.dispute.created": _on_dispute_withdrawn,
    "charge.dispute.funds_withdrawn": _on_dispute_withdrawn,
    "charge.dispute.funds_reinstated": _on_dispute_reinstated,
}


def _payment_failed_notify(
    *,
    organization_id: int,
    amount_usd: Decimal,
    reason: str,
    auto_topup_disabled: bool = False,
) -> None:
    """E-mail the billing contacts that a payment failed, once the transaction that recorded
    it commits (billing.alerts writes the message)."""
    transaction.on_commit(
        lambda: alert_payment_failed(
            organization_id=organization_id,
            amount_usd=amount_usd,
            reason=reason,
            auto_topup_disabled=auto_topup_disabled,
        )
    )


# Auto top-up


@dataclass(frozen=True, slots=True)
class AutoTopUpTerms:
    enabled: bool
    threshold_usd: Decimal
    amount_usd: Decimal


def auto_topup_configure(*, organization: Organization, terms: AutoTopUpTerms) -> BillingProfile:
    """Change the organisation's auto top-up; enabling it needs a saved card."""
    if terms.enabled:
        if terms.threshold_usd < ZERO_USD:
            raise PaymentError("the threshold cannot be negative")
        topup_amount_parse(str(terms.amount_usd))  # same bounds as a manual top-up
    profile = billing_profile_get_or_create(organization_id=organization.pk)
    if terms.enabled and not profile.auto_topup_payment_method_id:
        raise PaymentError("save a card before turning auto top-up on")
    BillingProfile.objects.filter(pk=profile.pk).update(
        auto_topup_enabled=terms.enabled,
        auto_topup_threshold_usd=terms.threshold_usd,
        auto_topup_amount_usd=terms.amount_usd,
        auto_topup_failures=0,
    )
    profile.refresh_from_db()
    return profile


def auto_topup_card_save(*, organization: Organization, setup_intent_id: str) -> BillingProfile:
    """Keep the card a succeeded SetupIntent saved as the auto top-up card."""
    customer_id = stripe_customer_ensure(organization=organization)
    try:
        card = stripe_api.setup_intent_saved_card(
            setup_intent_id=setup_intent_id, customer_id=customer_id
        )
    except stripe_api.StripeCallFailed as error:
        raise PaymentError(str(error)) from None
    BillingProfile.objects.filter(organization_id=organization.pk).update(
        auto_topup_payment_method_id=card.payment_method_id,
        auto_topup_card_label=card.label[:100],
    )
    return billing_profile_get_or_create(organization_id=organization.pk)


def _wallet_balance_subquery() -> Coalesce:
    """The wallet's balance, zero when the organisation has no wallet yet."""
    return Coalesce(
        Subquery(
            Account.objects.filter(
                organization_id=OuterRef("organization_id"), kind=Account.Kind.WALLET
            ).values("balance_usd")[:1]
        ),
        ZERO_USD,
        output_field=usd_field(),
    )


def _due_profiles() -> Any:
    stale = timezone.now() - timedelta(seconds=settings.BILLING_AUTO_TOPUP_STALE_SECONDS)
    return (
        BillingProfile.objects.filter(auto_topup_enabled=True, stripe_customer_id__isnull=False)
        .exclude(auto_topup_payment_method_id="")
        .filter(
            Q(auto_topup_in_flight_since__isnull=True) | Q(auto_topup_in_flight_since__lt=stale)
        )
        .alias(balance=_wallet_balance_subquery())
        .filter(balance__lt=F("auto_topup_threshold_usd"))
    )


def auto_topups_due() -> list[int]:
    """Organisations whose wallet is below their auto top-up threshold with none in flight
    (one indexed query; beat runs it every minute)."""
    return list(_due_profiles().values_list("organization_id", flat=True)[:500])


def auto_topup_charge(*, organization_id: int) -> str:
    """Charge the saved card off-session for one auto top-up, if still due.

    The conditional UPDATE that sets `auto_topup_in_flight_since` is the claim: of concurrent
    runs for one organisation, one changes the row and the others find it in flight. The
    claim is cleared by the payment's webhook (or by the failure here), and ignored after
    BILLING_AUTO_TOPUP_STALE_SECONDS if no answer ever comes; the intent carries its attempt
    number, so a late answer about an older attempt leaves a newer claim alone.
    """
    now = timezone.now()
    claimed = (
        _due_profiles()
        .filter(organization_id=organization_id)
        .update(auto_topup_in_flight_since=now, auto_topup_attempts=F("auto_topup_attempts") + 1)
    )
    if claimed != 1:
        return "not due"
    profile = BillingProfile.objects.get(organization_id=organization_id)
    assert profile.stripe_customer_id is not None  # noqa: S101 - required by _due_profiles
    amount_usd, payment_method_id = _auto_topup_attempt_terms(profile=profile)
    try:
        intent = stripe_api.payment_intent_create(
            customer_id=profile.stripe_customer_id,
            amount_cents=cents_from_usd(amount_usd),
            organization_id=organization_id,
            origin=CardPayment.Origin.AUTO_TOPUP,
            idempotency_key=f"auto-topup-{organization_id}-{profile.auto_topup_attempts}",
            payment_method_id=payment_method_id,
            auto_topup_attempt=profile.auto_topup_attempts,
        )
    except stripe_api.CardDeclined as error:
        # Counted once, by the `payment_intent.payment_failed` event that Stripe sends for the
        # declined intent (it also releases the claim).
        return f"declined: {error}"
    except stripe_api.StripeUnavailable as error:
        # Not a failed card, and the intent may exist (only Stripe's answer was lost): give the
        # claim and its attempt number back, so the next run asks again with the same
        # idempotency key and Stripe answers with that intent instead of charging twice. Only
        # while the claim is ours: a webhook that cleared it has told the intent's outcome.
        # The terms asked for are kept with the number: the key may only be sent with them.
        BillingProfile.objects.filter(
            organization_id=organization_id, auto_topup_in_flight_since=now
        ).update(
            auto_topup_in_flight_since=None,
            auto_topup_attempts=F("auto_topup_attempts") - 1,
            auto_topup_retry_amount_usd=amount_usd,
            auto_topup_retry_payment_method_id=payment_method_id,
        )
        return f"waiting: {error}"
    except stripe_api.StripeCallFailed as error:
        with transaction.atomic():
            _auto_topup_failure_record(
                organization_id=organization_id,
                attempt=profile.auto_topup_attempts,
                amount_usd=amount_usd,
                message=str(error),
            )
        return f"failed: {error}"
    CardPayment.objects.get_or_create(
        stripe_payment_intent_id=intent.id,
        defaults={
            "organization_id": organization_id,
            "amount_usd": amount_usd,
            "origin": CardPayment.Origin.AUTO_TOPUP,
        },
    )
    return f"charged {intent.id} ({intent.status})"


def _auto_topup_attempt_terms(*, profile: BillingProfile) -> tuple[Decimal, str]:
    """The amount and card the claimed attempt charges: a retry of an attempt whose number was
    given back asks for what that attempt asked for (its idempotency key is sent again, and
    Stripe accepts a key only with the parameters it was first used with); a new attempt asks
    for the owner's current terms. The kept terms are cleared once read (by attempt number:
    the attempt's event may already have released the claim); were this call lost too, they
    are kept again."""
    if profile.auto_topup_retry_amount_usd is None:
        return profile.auto_topup_amount_usd, profile.auto_topup_payment_method_id
    BillingProfile.objects.filter(
        pk=profile.pk, auto_topup_attempts=profile.auto_topup_attempts
    ).update(auto_topup_retry_amount_usd=None, auto_topup_retry_payment_method_id="")
    return profile.auto_topup_retry_amount_usd, profile.auto_topup_retry_payment_method_id


def _auto_topup_attempt(intent: dict[str, Any]) -> int | None:
    """The attempt number an auto top-up's PaymentIntent was made under (signed back in its
    metadata); None for an intent made before intents carried it."""
    attempt = str((intent.get("metadata") or {}).get("auto_topup_attempt", ""))
    return int(attempt) if attempt.isdigit() else None


def _auto_topup_latest(*, organization_id: int, attempt: int | None) -> QuerySet[BillingProfile]:
    """The organisation's profile, if `attempt` is its latest auto top-up: the one whose
    claim is in flight, or the one whose attempt number was given back (Stripe out of reach).

    Only the latest attempt's outcome releases the claim and counts or resets failures: an
    older top-up whose claim expired (no answer within BILLING_AUTO_TOPUP_STALE_SECONDS) may
    answer after a newer one was claimed and charged, and releasing that newer claim would
    let a third top-up be charged while it is still pending. Matched by the same UPDATE that
    changes the row, so a concurrent claim either comes first (and the event matches nothing)
    or after (and finds the claim released)."""
    if attempt is None:
        return BillingProfile.objects.none()
    return BillingProfile.objects.filter(
        organization_id=organization_id, auto_topup_attempts__lte=attempt
    )


def _auto_topup_given_back_answered(*, organization_id: int, attempt: int | None) -> None:
    """The outcome of an attempt whose number was given back (Stripe's answer to its create
    call was lost) has arrived: take the number again, with its kept terms dropped, so that
    the next run makes a new attempt under a new key. Asked again under the old key, Stripe
    would answer with this finished intent (or replay its decline) and send no event about it
    again, and that run's claim would be held until BILLING_AUTO_TOPUP_STALE_SECONDS.

    Only while no claim is held: a run that claimed the number first sends the old key, and
    this event releases that claim as the latest attempt's (`_auto_topup_latest`). Inside the
    event's `transaction.atomic()`, before the latest attempt's update."""
    if attempt is None:
        return
    BillingProfile.objects.filter(
        organization_id=organization_id,
        auto_topup_attempts=attempt - 1,
        auto_topup_in_flight_since__isnull=True,
    ).update(
        auto_topup_attempts=attempt,
        auto_topup_retry_amount_usd=None,
        auto_topup_retry_payment_method_id="",
    )


def _auto_topup_failure_record(
    *, organization_id: int, attempt: int | None, amount_usd: Decimal, message: str
) -> None:
    """Notify the owners of a failed auto top-up; if it is the latest attempt, count it,
    release the claim and switch auto top-up off after BILLING_AUTO_TOPUP_MAX_FAILURES in a
    row. Inside `transaction.atomic()`."""
    counted = _auto_topup_latest(organization_id=organization_id, attempt=attempt).update(
        auto_topup_failures=F("auto_topup_failures") + 1, auto_topup_in_flight_since=None
    )
    switched_off = counted and BillingProfile.objects.filter(
        organization_id=organization_id,
        auto_topup_enabled=True,
        auto_topup_failures__gte=settings.BILLING_AUTO_TOPUP_MAX_FAILURES,
    ).update(auto_topup_enabled=False)
    _payment_failed_notify(
        organization_id=organization_id,
        amount_usd=amount_usd,
        reason=f"auto top-up: {message}",
        auto_topup_disabled=bool(switched_off),
    )
