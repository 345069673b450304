"""Billing alerts by e-mail: once per low-balance crossing, once per cap window, payments."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.alerts import alert_payment_failed, low_balance_alerts_check, spend_cap_alerts_check
from billing.models import BillingAlertSettings, SpendCap, SpendCapAlert
from billing.services import CapTerms, credit_clawback, credit_grant, credit_reserve, usage_settle
from billing.tasks import check_billing_alerts
from portal.models import Membership
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db

THRESHOLD = Decimal(5)


def owner_email(organization) -> str:
    return Membership.objects.get(organization=organization, role=Membership.Role.OWNER).user.email


def clawback(organization, amount: str) -> None:
    credit_clawback(organization=organization, amount_usd=Decimal(amount), reason="test")


def grant(organization, amount: str) -> None:
    credit_grant(organization=organization, amount_usd=Decimal(amount), reason="test")


def check() -> int:
    return low_balance_alerts_check(default_threshold_usd=THRESHOLD)


def test_low_balance_alerts_once_per_crossing(mailoutbox):
    org = make_org(credit_usd="10")
    steady = make_org(credit_usd="10")  # another organisation, never below

    assert check() == 0  # seen above: armed
    clawback(org, "6")  # 4 < 5
    assert check() == 1
    assert check() == 0
    clawback(org, "1")  # still below: the same crossing
    assert check() == 0
    grant(org, "3")  # 6: above again, re-armed by the next check
    assert check() == 0
    clawback(org, "2")  # 4: a new crossing
    assert check() == 1

    assert [m.to for m in mailoutbox] == [[owner_email(org)], [owner_email(org)]]
    assert "4.0000000000 USD" in mailoutbox[0].body
    assert "below 5.0000000000 USD" in mailoutbox[0].subject
    assert owner_email(steady) not in {m.to[0] for m in mailoutbox}


def test_a_wallet_never_funded_above_the_threshold_does_not_alert(mailoutbox):
    make_org(credit_usd="1")

    assert check() == 0
    assert mailoutbox == []


def test_an_organisations_own_threshold_and_billing_email_win(mailoutbox):
    org = make_org(credit_usd="10")
    BillingAlertSettings.objects.create(
        organization=org, billing_email="ap@example.com", low_balance_threshold_usd=Decimal(20)
    )
    grant(org, "15")  # 25
    check()
    clawback(org, "6")  # 19 < 20, though far above the default 5

    assert check() == 1
    assert [m.to for m in mailoutbox] == [["ap@example.com"]]


def test_a_failing_mail_server_leaves_the_alert_armed(mailoutbox, settings):
    org = make_org(credit_usd="10")
    check()
    clawback(org, "6")
    settings.EMAIL_BACKEND = "tests.billing.test_alerts.FailingBackend"

    with pytest.raises(ConnectionError):
        check()
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

    assert check() == 1
    assert len(mailoutbox) == 1


class FailingBackend:
    def __init__(self, **kwargs: object) -> None:
        pass

    def send_messages(self, messages: object) -> int:
        raise ConnectionError("mail server down")


def spend(org, key, request_id: str, cap: CapTerms) -> None:
    credit_reserve(
        request_id=request_id,
        organization_id=org.pk,
        api_key_id=key.pk,
        amount_usd=Decimal("0.0035"),
        spend_cap=cap,
    )
    usage_settle(metered=metered(key.pk, org.pk, request_id=request_id))  # 0.0035 USD


def test_a_key_reaching_its_cap_alerts_once_per_window(mailoutbox):
    org = make_org(credit_usd="10")
    capped, _ = make_key(org, name="capped")
    other, _ = make_key(org, name="other")
    cap = CapTerms(amount_usd=Decimal("0.007"), window=SpendCap.Window.DAY)
    SpendCap.objects.create(api_key=capped, amount_usd=cap.amount_usd, window=cap.window)
    SpendCap.objects.create(api_key=other, amount_usd=Decimal(1), window=cap.window)

    spend(org, capped, "r1", cap)
    spend(org, other, "o1", CapTerms(amount_usd=Decimal(1), window=SpendCap.Window.DAY))
    assert spend_cap_alerts_check(percent=100) == 0  # half the cap
    spend(org, capped, "r2", cap)  # the whole cap

    assert spend_cap_alerts_check(percent=100) == 1
    assert spend_cap_alerts_check(percent=100) == 0
    [message] = mailoutbox
    assert "'capped'" in message.subject
    assert message.to == [owner_email(org)]
    assert SpendCapAlert.objects.get().api_key == capped


def test_the_beat_task_runs_both_checks(mailoutbox, settings):
    settings.BILLING_LOW_BALANCE_THRESHOLD_USD = THRESHOLD
    org = make_org(credit_usd="10")
    check_billing_alerts()
    clawback(org, "9")

    assert check_billing_alerts() == 1
    assert len(mailoutbox) == 1


def test_a_failed_payment_is_told_to_the_billing_contacts(mailoutbox):
    org = make_org(credit_usd=None)
    make_org(credit_usd=None)  # another organisation: not told

    sent = alert_payment_failed(
        organization_id=org.pk,
        amount_usd=Decimal("25"),
        reason="Your card was declined.",
        auto_topup_disabled=True,
    )

    assert sent == 1
    [message] = mailoutbox
    assert message.to == [owner_email(org)]
    assert "25.0000000000 USD" in message.subject
    assert "Your card was declined." in message.body
    assert "Auto top-up has been switched off" in message.body
