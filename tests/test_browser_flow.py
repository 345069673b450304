"""The whole product in Chromium: sign up, verify the address from the outbox, create a key on
the dashboard, call /v1/chat/completions with it through the openai SDK, and find the request
in the log and the chart; and the same pages with the keyboard alone. Screenshots go to
var/test-artifacts/ (CI keeps them).

Playwright for Python drives Debian's Chromium (/usr/bin/chromium); no browser is downloaded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from django.core.handlers.asgi import ASGIHandler
from openai import OpenAI
from playwright.sync_api import Page, expect, sync_playwright

from billing.services import credit_grant
from gateway.asgi import GatewayASGIHandler
from portal.models import Membership, User
from portal.services import organization_create_personal
from tests.servers import ThreadedServer

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "var" / "test-artifacts"
PASSWORD = "a long enough passphrase 42"
T = TypeVar("T")


def off_the_loop(work: Callable[[], T]) -> T:
    """Run ORM work in another thread: Playwright's sync API keeps an event loop running in
    this one, where Django refuses synchronous database calls."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


@pytest.fixture
def live_site(settings, transactional_db, catalog) -> Iterator[str]:
    """Switchboard's ASGI app, as portal/asgi.py composes it, on a free port, with static files
    served from the apps' folders (ServeStatic reads its settings when the handler is built)."""
    settings.SERVESTATIC_USE_FINDERS = True
    site, gateway = ASGIHandler(), GatewayASGIHandler()

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = gateway if scope["type"] == "http" and scope["path"].startswith("/v1/") else site
        await handler(scope, receive, send)

    server = ThreadedServer(application).start()
    yield server.url
    server.stop()


def wait_for_mail(to: str, *, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in mail.outbox:
            if to in message.to:
                return message
        time.sleep(0.05)
    raise AssertionError(f"no e-mail to {to} within {timeout}s")


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_sign_up_create_a_key_call_the_api_and_see_it_in_the_log_and_chart(live_site, mailoutbox):
    email = "dana@example.com"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            # Sign up; the address must be verified before the dashboard opens.
            page.goto(f"{live_site}/accounts/signup/")
            page.fill("#id_email", email)
            page.fill("#id_password1", PASSWORD)
            page.fill("#id_password2", PASSWORD)
            shot(page, "01-sign-up")
            page.click("form button[type=submit]")
            message = wait_for_mail(email)
            link = re.search(r"(http://127\.0\.0\.1:\d+/accounts/confirm-email/\S+)", message.body)
            assert link, message.body
            page.goto(link.group(1))
            shot(page, "02-confirm-email")
            page.click("form button[type=submit]")
            expect(page.locator("h1")).to_contain_text("(personal)")

            def fund() -> None:
                organization = Membership.objects.get(user__email=email).organization
                credit_grant(organization=organization, amount_usd=Decimal(5), reason="test")

            off_the_loop(fund)

            # Create a key on the dashboard; its secret is shown once.
            page.fill("#key-name", "browser key")
            page.click("text=Create key")
            secret = page.input_value("#secret")
            assert secret.startswith("sb_")
            shot(page, "03-key-created")

            # Call the API with it, through the official SDK.
            client = OpenAI(base_url=f"{live_site}/v1", api_key=secret, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="fake-small", messages=[{"role": "user", "content": "Hello from Chromium"}]
            )
            request_id = raw.headers["x-request-id"]
            assert raw.parse().choices[0].message.content

            # The request is in the log...
            page.goto(f"{live_site}/dashboard/usage/log")
            row = page.locator("#request-log tbody tr", has_text=request_id)
            expect(row).to_have_count(1)
            expect(row).to_contain_text("fake-small")
            expect(row).to_contain_text("browser key")
            shot(page, "04-request-log")

            # ...and in the chart, drawn by uPlot from the app's own static file.
            page.goto(f"{live_site}/dashboard/usage/")
            expect(page.locator("#spend-chart[data-drawn=true] canvas")).to_have_count(1)
            expect(page.locator("#spend-chart .u-legend")).to_contain_text("fake-small")
            expect(page.locator("#usage-table tbody tr")).to_have_count(1)
            expect(page.locator("#usage-table tbody tr")).to_contain_text("fake-small")
            shot(page, "05-usage-chart")
        except Exception:
            shot(page, "failure")
            raise
        finally:
            browser.close()


def tab_to(page: Page, selector: str, *, most: int = 40) -> None:
    """Press Tab until `selector` has the focus, as a keyboard user would."""
    for _ in range(most):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement === document.querySelector(s)", selector):
            return
    raise AssertionError(f"{selector} is not reachable with Tab")


def focus_outline(page: Page) -> str:
    return page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")


def test_with_the_keyboard_alone_log_in_create_a_key_and_copy_it(live_site):
    email = "kim@example.com"

    def make_user() -> None:
        user = User.objects.create_user(email=email, password=PASSWORD)
        EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
        organization_create_personal(user=user)

    off_the_loop(make_user)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{live_site}/accounts/login/")
            # The first Tab reaches the skip link, which shows itself when focused.
            page.keyboard.press("Tab")
            expect(page.locator(":focus")).to_have_text("Skip to content")
            assert focus_outline(page) != "none"

            tab_to(page, "#id_login")
            assert focus_outline(page) != "none"  # where the focus is can be seen
            page.keyboard.type(email)
            tab_to(page, "#id_password")
            page.keyboard.type(PASSWORD)
            page.keyboard.press("Enter")
            expect(page.locator("h1")).to_contain_text("(personal)")

            tab_to(page, "#key-name")
            page.keyboard.type("keyboard key")
            page.keyboard.press("Enter")
            expect(page.locator("#secret")).to_have_value(re.compile(r"^sb_"))

            tab_to(page, "#copy-secret")
            page.keyboard.press("Enter")
            expect(page.locator("#copy-status")).not_to_have_text("")
            shot(page, "06-keyboard-key-created")
        except Exception:
            shot(page, "keyboard-failure")
            raise
        finally:
            browser.close()


# The elements that stick out on the right, to name them when the test fails.
WIDER_THAN_THE_SCREEN = """() => [...document.querySelectorAll('body *')]
  .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
  .filter(e => !e.closest('.table-wrap, .chart'))
  .slice(0, 5).map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className)"""

NARROW_PAGES = ["/dashboard/", "/dashboard/org/", "/dashboard/usage/", "/dashboard/usage/log"]
NARROW_PAGES += ["/dashboard/statements/", "/dashboard/tokens", "/catalog/"]


def test_on_a_phone_sized_screen_no_page_scrolls_sideways(live_site):
    email = "lee@example.com"

    def make_user() -> None:
        user = User.objects.create_user(email=email, password=PASSWORD)
        EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
        organization_create_personal(user=user)

    off_the_loop(make_user)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 390, "height": 844})
        try:
            page.goto(f"{live_site}/accounts/login/")
            page.fill("#id_login", email)
            page.fill("#id_password", PASSWORD)
            page.click("form button[type=submit]")
            expect(page.locator("h1")).to_contain_text("(personal)")
            for path in NARROW_PAGES:
                page.goto(f"{live_site}{path}")
                overflow = page.evaluate(
                    "() => document.documentElement.scrollWidth - window.innerWidth"
                )
                wide = page.evaluate(WIDER_THAN_THE_SCREEN)
                assert overflow <= 0, f"{path} is {overflow}px wider than the screen: {wide}"
            shot(page, "07-phone-width")
        except Exception:
            shot(page, "phone-failure")
            raise
        finally:
            browser.close()
