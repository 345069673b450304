"""The webhook endpoint's signature matrix: anything but one good signature is a 400 with no
side effect."""

from __future__ import annotations

import time

import pytest
from django.test import Client
from django.urls import reverse

from billing.models import StripeEvent
from tests.billing.conftest import event, sign

pytestmark = pytest.mark.django_db

PAYLOAD = event("evt_sig_1", "payment_intent.payment_failed", {"id": "pi_unknown", "metadata": {}})


def post(client: Client, payload: bytes, signature: str | None) -> int:
    headers = {} if signature is None else {"Stripe-Signature": signature}
    response = client.post(
        reverse("stripe_webhook"), data=payload, content_type="application/json", headers=headers
    )
    return response.status_code


def test_it_refuses_a_missing_signature(client: Client, stripe_webhook_secret: str) -> None:
    assert post(client, PAYLOAD, None) == 400
    assert not StripeEvent.objects.exists()


def test_it_refuses_a_bad_signature(client: Client, stripe_webhook_secret: str) -> None:
    good = sign(PAYLOAD)
    bad = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    assert post(client, PAYLOAD, bad) == 400
    assert post(client, PAYLOAD, "garbage") == 400
    assert not StripeEvent.objects.exists()


def test_it_refuses_a_signature_made_with_another_secret(
    client: Client, stripe_webhook_secret: str
) -> None:
    assert post(client, PAYLOAD, sign(PAYLOAD, secret="whsec_someone_else")) == 400
    assert not StripeEvent.objects.exists()


def test_it_refuses_a_tampered_body(client: Client, stripe_webhook_secret: str) -> None:
    signature = sign(PAYLOAD)
    assert post(client, PAYLOAD.replace(b"pi_unknown", b"pi_other"), signature) == 400
    assert not StripeEvent.objects.exists()


def test_it_refuses_a_stale_timestamp(client: Client, stripe_webhook_secret: str) -> None:
    assert post(client, PAYLOAD, sign(PAYLOAD, timestamp=int(time.time()) - 301)) == 400
    assert not StripeEvent.objects.exists()


def test_it_refuses_a_future_timestamp(client: Client, stripe_webhook_secret: str) -> None:
    # Well past the 300 s tolerance: `int()` drops up to a second, so +301 was only 300.x s
    # ahead by the time the check ran late in a second, and was then accepted.
    assert post(client, PAYLOAD, sign(PAYLOAD, timestamp=int(time.time()) + 360)) == 400
    assert not StripeEvent.objects.exists()


def test_it_refuses_when_no_secret_is_configured(client: Client) -> None:
    assert post(client, PAYLOAD, sign(PAYLOAD)) == 400
    assert not StripeEvent.objects.exists()


def test_it_accepts_one_good_signature_among_bad_ones(
    client: Client, stripe_webhook_secret: str
) -> None:
    good = sign(PAYLOAD)
    t, v1 = good.split(",")
    bad = sign(PAYLOAD, secret="whsec_old").split(",")[1]
    assert post(client, PAYLOAD, f"{t},{bad},{v1},v0=deadbeef") == 200
    assert StripeEvent.objects.filter(event_id="evt_sig_1").count() == 1


def test_it_acknowledges_but_does_not_store_unhandled_types(
    client: Client, stripe_webhook_secret: str
) -> None:
    payload = event("evt_sig_2", "customer.created", {"id": "cus_1"})
    assert post(client, payload, sign(payload)) == 200
    assert not StripeEvent.objects.exists()


def test_it_answers_405_to_a_get(client: Client) -> None:
    assert client.get(reverse("stripe_webhook")).status_code == 405
