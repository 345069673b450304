"""A key's spend cap is held like the wallet: exactly, per window, and it resets."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest

from billing.models import KeySpend, SpendCap
from billing.services import (
    CapTerms,
    SpendCapExceeded,
    credit_reserve,
    reservation_void,
    spend_window_bounds,
    usage_settle,
)
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db

DAILY_CAP = CapTerms(amount_usd=Decimal("0.01"), window=SpendCap.Window.DAY)
DAY_1 = datetime(2026, 11, 29, 23, 59, tzinfo=UTC)
# The tests that leave holds behind hold them at the end of today, not of a fixed day: the
# suite's reconcile check reports a hold older than an hour as stale (a fixed day made these
# tests fail for good once the real clock had passed it by an hour).
MIDNIGHT = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), time(), tzinfo=UTC)
TONIGHT, TOMORROW = MIDNIGHT - timedelta(minutes=1), MIDNIGHT + timedelta(minutes=1)


def reserve(org, key, request_id: str, amount: str, now: datetime) -> None:
    credit_reserve(
        request_id=request_id,
        organization_id=org.pk,
        api_key_id=key.pk,
        amount_usd=Decimal(amount),
        spend_cap=DAILY_CAP,
        now=now,
    )


def test_holds_and_spend_count_against_the_cap_and_it_resets_daily():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    other_key, _ = make_key(org)

    reserve(org, key, "req_1", "0.006", TONIGHT)
    usage_settle(metered=metered(key.pk, org.pk, request_id="req_1"))  # spends 0.0035
    reserve(org, key, "req_2", "0.0065", TONIGHT)  # 0.0035 spent + 0.0065 held = the cap
    with pytest.raises(SpendCapExceeded) as caught:
        reserve(org, key, "req_3", "0.0000000001", TONIGHT)
    reserve(org, other_key, "theirs", "0.01", TONIGHT)  # another key's cap is its own
    reserve(org, key, "req_4", "0.01", TOMORROW)  # a new day

    assert caught.value.resets_at == MIDNIGHT
    today = KeySpend.objects.get(api_key=key, window_start=MIDNIGHT - timedelta(days=1))
    assert (today.spent_usd, today.reserved_usd) == (Decimal("0.0035"), Decimal("0.0065"))


def test_a_voided_request_gives_its_hold_back_to_the_cap():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    reserve(org, key, "req_1", "0.01", TONIGHT)

    reservation_void(request_id="req_1")
    reserve(org, key, "req_2", "0.01", TONIGHT)

    assert KeySpend.objects.get(api_key=key).reserved_usd == Decimal("0.01")


@pytest.mark.parametrize(
    ("window", "start", "end"),
    [
        (
            SpendCap.Window.DAY,
            datetime(2026, 11, 29, tzinfo=UTC),
            datetime(2026, 11, 30, tzinfo=UTC),
        ),
        (
            SpendCap.Window.WEEK,
            datetime(2026, 11, 23, tzinfo=UTC),
            datetime(2026, 11, 30, tzinfo=UTC),
        ),
        (
            SpendCap.Window.MONTH,
            datetime(2026, 11, 1, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
        ),
        (SpendCap.Window.TOTAL, datetime(1970, 1, 1, tzinfo=UTC), None),
    ],
)
def test_window_bounds(window, start, end):
    assert spend_window_bounds(window, DAY_1) == (start, end)


def test_december_rolls_into_january():
    december = datetime(2026, 12, 31, 12, tzinfo=UTC)
    assert spend_window_bounds(SpendCap.Window.MONTH, december)[1] == datetime(
        2027, 1, 1, tzinfo=UTC
    )


def test_window_bounds_follow_the_time_asked_for_back_and_forth():
    # The bounds last asked for are kept: a time outside them is not answered with them.
    days = [DAY_1, DAY_1 + timedelta(days=1, hours=1), DAY_1, DAY_1 - timedelta(days=40)]
    for now in days:
        start, end = spend_window_bounds(SpendCap.Window.DAY, now)
        assert end is not None and start <= now < end and end - start == timedelta(days=1)
