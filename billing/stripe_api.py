"""The one place that talks to Stripe: the SDK configured from settings, and the calls billing
makes, each with an idempotency key.

`STRIPE_API_BASE` points the SDK at any Stripe-compatible server (localstripe in tests). Callers
get plain values back, never SDK objects, so no other module imports `stripe`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import stripe
from django.conf import settings

# Explicit network bounds: a slow Stripe must not hold a worker or a page for ever.
_TIMEOUT_SECONDS = 20
_NETWORK_RETRIES = 2  # the SDK retries only what is safe, reusing the idempotency key


class StripeNotConfigured(Exception):
    """STRIPE_SECRET_KEY is empty: card payments are off."""


class StripeCallFailed(Exception):
    """Stripe refused or could not be reached; the message is safe to show an owner."""


class CardDeclined(StripeCallFailed):
    """Stripe refused the card; its PaymentIntent exists and a `payment_failed` event follows."""


class StripeUnavailable(StripeCallFailed):
    """No usable answer from Stripe (unreachable, timed out, its own error, rate limited): not
    the card's fault, and a write may have happened even so (only its answer was lost)."""


class WebhookSignatureInvalid(Exception):
    """A webhook whose signature is missing, wrong, or whose timestamp is out of tolerance."""


@cache
def _client(api_key: str, api_base: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base},
        max_network_retries=_NETWORK_RETRIES,
        http_client=stripe.RequestsClient(timeout=_TIMEOUT_SECONDS),
    )


def stripe_client() -> stripe.StripeClient:
    """The SDK client for the current settings (cached per key and base)."""
    if not settings.STRIPE_SECRET_KEY:
        raise StripeNotConfigured("card payments are not configured (STRIPE_SECRET_KEY)")
    return _client(settings.STRIPE_SECRET_KEY, settings.STRIPE_API_BASE.rstrip("/"))


def _options(idempotency_key: str) -> Any:
    return {"idempotency_key": idempotency_key}


def customer_create(*, organization_id: int, name: str, idempotency_key: str) -> str:
    """Create the organisation's Stripe Customer; returns its id."""
    try:
        customer = stripe_client().v1.customers.create(
            params={"name": name, "metadata": {"organization_id": str(organization_id)}},
            options=_options(idempotency_key),
        )
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    return str(customer.id)


@dataclass(frozen=True, slots=True)
class CreatedIntent:
    id: str
    client_secret: str
    status: str


def payment_intent_create(
    *,
    customer_id: str,
    amount_cents: int,
    organization_id: int,
    origin: str,
    idempotency_key: str,
    payment_method_id: str,
    auto_topup_attempt: int | None = None,
) -> CreatedIntent:
    """A USD PaymentIntent for the customer, confirmed at once against `payment_method_id`.

    On-session (the dashboard) it may come back `requires_action` for the browser to finish
    3-D Secure with `confirmCardPayment`; off-session (an auto top-up, numbered by
    `auto_topup_attempt`) it succeeds or fails.
    A declined card raises CardDeclined, no answer from Stripe StripeUnavailable."""
    # Signed back to us in every event about the intent (and copied onto its charges).
    metadata = {"organization_id": str(organization_id), "switchboard_origin": origin}
    params: Any = {
        "amount": amount_cents,
        "currency": "usd",
        "customer": customer_id,
        "payment_method_types": ["card"],
        "metadata": metadata,
        "payment_method": payment_method_id,
        "confirm": True,
    }
    if auto_topup_attempt is not None:
        metadata["auto_topup_attempt"] = str(auto_topup_attempt)
        params["off_session"] = True
    try:
        intent = stripe_client().v1.payment_intents.create(
            params=params, options=_options(idempotency_key)
        )
    except stripe.CardError as error:
        raise CardDeclined(_safe_message(error)) from None
    except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as error:
        raise StripeUnavailable(_safe_message(error)) from None
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    return CreatedIntent(
        id=str(intent.id), client_secret=str(intent.client_secret or ""), status=str(intent.status)
    )


def setup_intent_create(*, customer_id: str, idempotency_key: str) -> CreatedIntent:
    """A SetupIntent that saves a card on the customer for off-session charges."""
    try:
        params: Any = {
            "customer": customer_id,
            "payment_method_types": ["card"],
            "usage": "off_session",
        }
        intent = stripe_client().v1.setup_intents.create(
            params=params,
            options=_options(idempotency_key),
        )
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    return CreatedIntent(
        id=str(intent.id), client_secret=str(intent.client_secret or ""), status=str(intent.status)
    )


@dataclass(frozen=True, slots=True)
class SavedCard:
    payment_method_id: str
    label: str  # e.g. "visa •••• 4242"


def setup_intent_saved_card(*, setup_intent_id: str, customer_id: str) -> SavedCard:
    """The card a succeeded SetupIntent of this customer saved (re-fetched from Stripe: the
    browser's word is not trusted)."""
    try:
        client = stripe_client()
        intent = client.v1.setup_intents.retrieve(setup_intent_id)
        if intent.customer != customer_id or intent.status != "succeeded":
            raise StripeCallFailed("the card was not saved; please try again")
        method_id = str(intent.payment_method)
        method = client.v1.payment_methods.retrieve(method_id)
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    card = method.card
    label = f"{card.brand} •••• {card.last4}" if card else "card"
    return SavedCard(payment_method_id=method_id, label=label)


class StripeObjectMissing(StripeCallFailed):
    """Stripe has no such object (not of this account or mode)."""


def payment_intent_fetch(*, payment_intent_id: str) -> dict[str, Any]:
    """A PaymentIntent as Stripe has it now, shaped as in a webhook event's `data.object`.

    Webhook handlers move money on this, not on the event's copy, which may be stale (events
    arrive late, repeated and out of order)."""
    try:
        intent = stripe_client().v1.payment_intents.retrieve(payment_intent_id)
    except stripe.InvalidRequestError as error:
        raise _missing_or_failed(error) from None
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    result: dict[str, Any] = intent.to_dict()
    return result


def charge_with_refunds_fetch(*, charge_id: str) -> dict[str, Any]:
    """A Charge as Stripe has it now, with every one of its refunds in `refunds.data`
    (`has_more` false), shaped as in a `charge.refunded` event's `data.object`.

    The refunds are listed rather than expanded: Stripe stopped embedding them in charges
    (API 2022-11-15), and the list pages through however many there are."""
    try:
        client = stripe_client()
        charge = client.v1.charges.retrieve(charge_id).to_dict()
        listed: Any = {"charge": charge_id, "limit": 100}
        refunds = [
            refund.to_dict() for refund in client.v1.refunds.list(params=listed).auto_paging_iter()
        ]
    except stripe.InvalidRequestError as error:
        raise _missing_or_failed(error) from None
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    charge["refunds"] = {"object": "list", "data": refunds, "has_more": False}
    return charge


def charge_of_refund_fetch(*, refund_id: str) -> dict[str, Any]:
    """The Charge a refund is of, as `charge_with_refunds_fetch` gives it: an event about one
    refund (`refund.failed`, `refund.updated`, `charge.refund.updated`) is applied by settling
    its charge's refunds together, as Stripe has them now."""
    try:
        charge_id = stripe_client().v1.refunds.retrieve(refund_id).charge
    except stripe.InvalidRequestError as error:
        raise _missing_or_failed(error) from None
    except stripe.StripeError as error:
        raise StripeCallFailed(_safe_message(error)) from None
    if not charge_id:
        raise StripeObjectMissing("the refund is not of a charge")
    return charge_with_refunds_fetch(charge_id=str(charge_id))


def _missing_or_failed(error: stripe.InvalidRequestError) -> StripeCallFailed:
    if error.http_status == 404 or error.code == "resource_missing":
        return StripeObjectMissing("no such object in Stripe")
    return StripeCallFailed(_safe_message(error))


def webhook_event_verified(*, payload: bytes, signature_header: str | None) -> dict[str, Any]:
    """The event a webhook body carries, once its signature is proven.

    The SDK checks the HMAC (any one of several `v1=` entries may match) and refuses stale
    timestamps; it accepts timestamps in the future, so that is checked here too (a replay
    captured with a skewed clock must not stay valid for ever).
    """
    if not signature_header or not settings.STRIPE_WEBHOOK_SECRET:
        raise WebhookSignatureInvalid("missing signature")
    tolerance = settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS
    try:
        event = stripe.Webhook.construct_event(
            payload, signature_header, settings.STRIPE_WEBHOOK_SECRET, tolerance=tolerance
        )
    except (stripe.SignatureVerificationError, ValueError):
        raise WebhookSignatureInvalid("bad signature") from None
    timestamps = [
        part.split("=", 1)[1] for part in signature_header.split(",") if part.startswith("t=")
    ]
    if not timestamps or int(timestamps[0]) > time.time() + tolerance:
        raise WebhookSignatureInvalid("timestamp in the future")
    result: dict[str, Any] = event.to_dict()
    return result


def _safe_message(error: stripe.StripeError) -> str:
    """What an owner may read: Stripe's user-facing card message, never keys or internals."""
    if isinstance(error, stripe.CardError) and error.user_message:
        return str(error.user_message)[:300]
    if isinstance(error, stripe.CardError):
        return "the card was declined"
    return "the payment provider could not be reached; please try again"
