"""Who may use the "Add credit" and "Auto top-up" pages, and what their endpoints answer."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse

from billing.models import BillingProfile, CardPayment
from billing.selectors import wallet_balance_usd
from portal.models import Membership, Organization, User
from tests.billing.stripe_helpers import GOOD_CARD, collect_card, wait_for
from tests.factories import make_org
from tests.stripe_server import LocalStripe

pytestmark = pytest.mark.django_db


def member_of(organization: Organization, role: str) -> User:
    user = User.objects.create_user(email=f"{role}-{organization.slug}@example.com")
    Membership.objects.create(organization=organization, user=user, role=role)
    return user


def owner_of(organization: Organization) -> User:
    return Membership.objects.get(organization=organization, role="owner").user


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_forbids_plain_members_every_payment_page() -> None:
    organization = make_org()
    client = logged_in(member_of(organization, "member"))
    org = {"org": organization.slug}
    assert client.get(reverse("add_credit"), org).status_code == 403
    assert client.get(reverse("auto_topup"), org).status_code == 403
    assert client.post(reverse("auto_topup"), org | {"enabled": "on"}).status_code == 403
    assert client.post(reverse("add_credit_pay"), org | {"amount_usd": "10"}).status_code == 403
    assert client.post(reverse("auto_topup_card"), org).status_code == 403
    status_url = reverse("add_credit_status", kwargs={"payment_intent_id": "pi_any"})
    assert client.get(status_url, org).status_code == 403
    assert b"owners and admins" in client.get(reverse("add_credit"), org).content


def test_it_shows_owners_and_admins_the_page_with_a_message_when_stripe_is_off() -> None:
    organization = make_org()
    for user in (owner_of(organization), member_of(organization, "admin")):
        response = logged_in(user).get(reverse("add_credit"), {"org": organization.slug})
        assert response.status_code == 200
        assert b"Card payments are unavailable" in response.content
        assert b"card-element" not in response.content


def test_it_refuses_amounts_outside_the_bounds_before_calling_stripe() -> None:
    organization = make_org()
    client = logged_in(owner_of(organization))
    for amount in ("4.99", "1000.01", "10.001", "ten", ""):
        response = client.post(
            reverse("add_credit_pay"), {"org": organization.slug, "amount_usd": amount}
        )
        assert response.status_code == 400, amount
        assert "error" in response.json()
    assert not CardPayment.objects.exists()


def test_it_refuses_an_amount_with_a_huge_exponent_at_once() -> None:
    # 1e999990 is a valid decimal; turning it into integer cents built a million-digit int,
    # which took the worker's CPU for about 30 seconds before the bounds refused it.
    organization = make_org()
    client = logged_in(owner_of(organization))
    started = time.monotonic()

    response = client.post(
        reverse("add_credit_pay"), {"org": organization.slug, "amount_usd": "1e999990"}
    )

    assert response.status_code == 400
    assert time.monotonic() - started < 2
    assert not CardPayment.objects.exists()


def test_it_refuses_auto_top_up_amounts_that_are_not_exact_dollars() -> None:
    organization = make_org()
    make_org()  # another organisation, whose settings stay untouched
    client = logged_in(owner_of(organization))
    for threshold in ("ten", "NaN", "Infinity", "5.12345678901234", "1e30"):
        response = client.post(
            reverse("auto_topup"),
            {"org": organization.slug, "threshold_usd": threshold, "amount_usd": "20"},
            follow=True,
        )
        assert b"Enter amounts in dollars" in response.content, threshold
    assert not BillingProfile.objects.exclude(auto_topup_amount_usd=0).exists()


def test_the_status_endpoint_shows_only_this_organisations_payments() -> None:
    mine, theirs = make_org(), make_org()
    CardPayment.objects.create(
        stripe_payment_intent_id="pi_theirs",
        organization=theirs,
        amount_usd=Decimal(10),
        origin=CardPayment.Origin.DASHBOARD,
    )
    CardPayment.objects.create(
        stripe_payment_intent_id="pi_mine",
        organization=mine,
        amount_usd=Decimal(10),
        origin=CardPayment.Origin.DASHBOARD,
    )
    client = logged_in(owner_of(mine))
    url = reverse("add_credit_status", kwargs={"payment_intent_id": "pi_theirs"})
    assert client.get(url, {"org": mine.slug}).status_code == 404
    assert client.get(url, {"org": theirs.slug}).status_code == 404  # not their member
    url = reverse("add_credit_status", kwargs={"payment_intent_id": "pi_mine"})
    answer = client.get(url, {"org": mine.slug}).json()
    assert answer == {
        "status": "pending",
        "amount_usd": "10.0000000000",
        "failure_message": "",
        "balance_usd": "10.0000000000",
    }


def test_the_dashboard_links_to_add_credit() -> None:
    organization = make_org()
    response = logged_in(owner_of(organization)).get(reverse("dashboard"))
    assert reverse("add_credit").encode() in response.content


@pytest.mark.django_db(transaction=True)
def test_an_admin_pays_and_the_webhook_credits_the_organisation(localstripe: LocalStripe) -> None:
    organization = make_org(credit_usd=None)
    neighbour = make_org(credit_usd=None)  # another organisation: not credited
    admin = member_of(organization, "admin")
    setup_intent_id = collect_card(localstripe, organization, GOOD_CARD)

    response = logged_in(admin).post(
        reverse("add_credit_pay"),
        {"org": organization.slug, "amount_usd": "25", "setup_intent_id": setup_intent_id},
    )

    assert response.status_code == 200
    wait_for(lambda: wallet_balance_usd(organization_id=organization.pk) == Decimal(25))
    assert CardPayment.objects.get().created_by == admin
    assert wallet_balance_usd(organization_id=neighbour.pk) == Decimal(0)
