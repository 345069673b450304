"""The spend-cap alert sent when the cap refuses a request: recorded once per key and window on
the refusal path, mailed by Celery after commit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.core.mail import EmailMessage
from django.utils import timezone

from billing import alerts
from billing.alerts import spend_cap_alerts_check, spend_cap_refusal_alert
from billing.models import KeySpend, SpendCap, SpendCapAlert
from billing.services import spend_window_bounds
from portal.models import Membership, Organization
from tests.factories import make_key, make_org


@pytest.fixture(autouse=True)
def _fresh_process() -> Iterator[None]:
    """Each test starts as a new process would: no cap alert known in memory."""
    alerts._cap_alerts_known.clear()
    yield
    alerts._cap_alerts_known.clear()


def owner_email(organization: Organization) -> str:
    return Membership.objects.get(organization=organization, role=Membership.Role.OWNER).user.email


def test_a_key_refused_by_its_cap_mails_the_owners_once_however_often_it_is_refused(
    gateway_url: str, catalog: object, eager_celery: None, mailoutbox: list[EmailMessage]
) -> None:
    organization = make_org(credit_usd="10")
    neighbour = make_org(credit_usd="10")  # another organisation: served, told nothing
    capped, capped_secret = make_key(organization, name="capped")
    SpendCap.objects.create(api_key=capped, amount_usd=Decimal("0.000001"))
    _, neighbour_secret = make_key(neighbour, name="free")

    def ask(secret: str) -> None:
        openai.OpenAI(base_url=gateway_url, api_key=secret, max_retries=0).chat.completions.create(
            model="fake-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )

    for _ in range(4):
        with pytest.raises(openai.APIStatusError) as caught:
            ask(capped_secret)
        assert caught.value.status_code == 402
    ask(neighbour_secret)

    [message] = mailoutbox
    assert message.to == [owner_email(organization)]
    assert "'capped'" in message.subject
    assert SpendCapAlert.objects.get().emailed_at is not None


@pytest.mark.django_db
def test_a_refusal_already_alerted_costs_no_query_in_this_process_and_one_in_another(
    django_assert_num_queries: object,
) -> None:
    organization = make_org()
    key, _ = make_key(organization)
    SpendCap.objects.create(api_key=key, amount_usd=Decimal(1), window=SpendCap.Window.TOTAL)

    def refused() -> bool:
        return spend_cap_refusal_alert(api_key_id=key.pk, window=SpendCap.Window.TOTAL)

    assert refused() is True

    with django_assert_num_queries(0):  # type: ignore[operator]
        assert refused() is False
    alerts._cap_alerts_known.clear()  # as another gateway process
    with django_assert_num_queries(1):  # type: ignore[operator]
        assert refused() is False
    assert SpendCapAlert.objects.count() == 1


@pytest.mark.django_db
def test_the_beat_check_does_not_alert_a_window_the_refusal_already_alerted(
    eager_celery: None,
    django_capture_on_commit_callbacks: object,
    mailoutbox: list[EmailMessage],
) -> None:
    organization = make_org()
    key, _ = make_key(organization)
    SpendCap.objects.create(api_key=key, amount_usd=Decimal(1), window=SpendCap.Window.TOTAL)
    window_start, _ = spend_window_bounds(SpendCap.Window.TOTAL, timezone.now())
    KeySpend.objects.create(api_key=key, window_start=window_start, spent_usd=Decimal(1))
    with django_capture_on_commit_callbacks(execute=True):  # type: ignore[operator]
        spend_cap_refusal_alert(api_key_id=key.pk, window=SpendCap.Window.TOTAL)
    assert len(mailoutbox) == 1

    later = timezone.now() + timedelta(minutes=5)
    assert spend_cap_alerts_check(now=later, percent=100) == 0
    assert len(mailoutbox) == 1


@pytest.mark.django_db
def test_an_alert_whose_mail_task_was_lost_is_mailed_by_the_beat_check_once(
    mailoutbox: list[EmailMessage],
) -> None:
    organization = make_org()
    key, _ = make_key(organization)
    SpendCap.objects.create(api_key=key, amount_usd=Decimal(1), window=SpendCap.Window.TOTAL)
    # Recorded, but its on-commit enqueue never runs (as if the broker lost the task).
    assert spend_cap_refusal_alert(api_key_id=key.pk, window=SpendCap.Window.TOTAL) is True
    assert spend_cap_alerts_check(percent=100) == 0  # within its grace: its task may yet run

    later = timezone.now() + timedelta(minutes=2)
    assert spend_cap_alerts_check(now=later, percent=100) == 1
    assert spend_cap_alerts_check(now=later, percent=100) == 0
    [message] = mailoutbox
    assert message.to == [owner_email(organization)]
