"""A top-up end to end: Chromium on the "Add credit" page, localstripe's Stripe.js and API,
and the signed webhook localstripe sends back to the live server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from playwright.sync_api import Browser, Page, expect, sync_playwright

from billing.models import CardPayment, StripeEvent
from billing.selectors import wallet_balance_usd
from portal.models import Membership, Organization, User
from tests.billing.conftest import ARTIFACTS_DIR
from tests.factories import make_org
from tests.stripe_server import LocalStripe

THREE_D_SECURE_CARD = "4000002500003155"  # asks the bank to authenticate: confirmCardPayment


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Playwright's sync API runs an event loop in this thread; Django's ORM calls made by the
    # test itself (not by the pages, served by the live server's threads) are still blocking
    # and safe, so its async guard is lifted for the duration.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
            yield browser
            browser.close()
    finally:
        if previous is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def logged_in_page(browser: Browser, live_server: Any, user: User) -> Page:
    client = Client()
    client.force_login(user)
    context = browser.new_context()
    context.add_cookies(
        [{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": live_server.url}]
    )
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


def owner_of(organization: Organization) -> User:
    return Membership.objects.get(organization=organization, role="owner").user


def test_it_tops_up_through_the_page_and_credits_from_the_webhook(
    localstripe: LocalStripe, live_server: Any, browser: Browser
) -> None:
    organization = make_org(credit_usd="1")
    other = make_org(credit_usd="3")
    page = logged_in_page(browser, live_server, owner_of(organization))
    page.goto(f"{live_server.url}/dashboard/credit/?org={organization.slug}")
    expect(page.locator("#balance")).to_have_text("1.0000000000")

    page.get_by_role("button", name="25 USD").click()
    page.fill("#card-element input[placeholder=number]", THREE_D_SECURE_CARD)
    page.fill("#card-element input[placeholder=exp_month]", "12")
    page.fill("#card-element input[placeholder=exp_year]", "40")
    page.fill("#card-element input[placeholder=cvc]", "123")
    page.fill("#card-element input[placeholder=postal_code]", "10001")
    page.get_by_role("button", name="Pay").click()
    # localstripe's 3-D Secure prompts: once to save the card, once in confirmCardPayment.
    page.get_by_role("button", name="Complete authentication").click()
    expect(page.locator("#payment-status")).to_contain_text("Confirm the payment")
    page.screenshot(path=ARTIFACTS_DIR / "topup-3ds.png")
    page.get_by_role("button", name="Complete authentication").click()
    expect(page.locator("#payment-status")).to_have_text("Payment pending…")
    page.screenshot(path=ARTIFACTS_DIR / "topup-pending.png")
    expect(page.locator("#payment-status")).to_contain_text(
        "New balance: 26.0000000000 USD", timeout=30_000
    )
    expect(page.locator("#balance")).to_have_text("26.0000000000")
    page.screenshot(path=ARTIFACTS_DIR / "topup-credited.png")

    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(26)
    assert wallet_balance_usd(organization_id=other.pk) == Decimal(3)
    payment = CardPayment.objects.get(organization=organization)
    assert (payment.status, payment.amount_usd, payment.origin) == ("succeeded", 25, "dashboard")
    assert StripeEvent.objects.filter(type="payment_intent.succeeded").count() == 1
