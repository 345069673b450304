"""Daily usage rollups: exact sums per organisation × key × model × day, idempotent, resumable."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from billing.models import BillingCursor, UsageDailyRollup, UsageRecord
from billing.rollups import usage_rollup, usage_rollup_day
from billing.services import usage_settle
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db

DAY_1 = datetime(2026, 11, 27, 10, tzinfo=UTC)
DAY_2 = datetime(2026, 11, 28, 23, 59, tzinfo=UTC)
FINAL_AFTER = timedelta(minutes=15)


def use(organization, key, request_id: str, moment: datetime, **overrides) -> None:
    usage_settle(metered=metered(key.pk, organization.pk, request_id=request_id, **overrides))
    UsageRecord.objects.filter(request_id=request_id).update(created_at=moment)


def rollups() -> list[tuple[object, ...]]:
    return list(
        UsageDailyRollup.objects.order_by("pk").values_list(
            "pk",
            "organization_id",
            "api_key_id",
            "model",
            "day",
            "requests",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "cost_usd",
        )
    )


@pytest.fixture
def usage():
    org = make_org()
    other_org = make_org()
    key, _ = make_key(org)
    key_2, _ = make_key(org)
    their_key, _ = make_key(other_org)
    use(org, key, "a", DAY_1)
    use(org, key, "b", DAY_1, cached_input_tokens=400)
    use(org, key, "c", DAY_1, model="fake-large")
    use(org, key_2, "d", DAY_1)
    use(org, key, "e", DAY_2)
    use(other_org, their_key, "f", DAY_1)
    return org, other_org, key, key_2, their_key


def test_it_sums_each_organisation_key_model_and_day(usage):
    org, other_org, key, key_2, their_key = usage

    days = usage_rollup(now=datetime(2026, 11, 29, 1, tzinfo=UTC), final_after=FINAL_AFTER)

    assert days == [date(2026, 11, 27), date(2026, 11, 28), date(2026, 11, 29)]
    got = {row[1:5]: row[5:] for row in rollups()}
    cost = Decimal("0.0035")
    cached_cost = Decimal("0.0033")  # 400 of 1000 input tokens at the cached price (0)
    assert got == {
        (org.pk, key.pk, "fake-small", date(2026, 11, 27)): (
            2,
            2000,
            4000,
            400,
            cost + cached_cost,
        ),
        (org.pk, key.pk, "fake-large", date(2026, 11, 27)): (1, 1000, 2000, 0, cost),
        (org.pk, key_2.pk, "fake-small", date(2026, 11, 27)): (1, 1000, 2000, 0, cost),
        (org.pk, key.pk, "fake-small", date(2026, 11, 28)): (1, 1000, 2000, 0, cost),
        (other_org.pk, their_key.pk, "fake-small", date(2026, 11, 27)): (1, 1000, 2000, 0, cost),
    }


def test_re_running_changes_nothing(usage):
    now = datetime(2026, 11, 29, 1, tzinfo=UTC)
    usage_rollup(now=now, final_after=FINAL_AFTER)
    first = rollups()
    BillingCursor.objects.all().delete()  # as if the cursor had never been written

    usage_rollup(now=now, final_after=FINAL_AFTER)
    usage_rollup_day(day=date(2026, 11, 27))

    assert rollups() == first


def test_the_cursor_passes_only_final_days_and_a_run_resumes_after_it(usage):
    org, _, key, _, _ = usage
    # 00:10 on the 29th: the 28th ended less than FINAL_AFTER ago.
    usage_rollup(now=datetime(2026, 11, 29, 0, 10, tzinfo=UTC), final_after=FINAL_AFTER)
    assert BillingCursor.objects.get(name="usage_rollup").through == date(2026, 11, 27)

    # A request of the 28th that committed late is picked up by the next run.
    use(org, key, "late", DAY_2)
    days = usage_rollup(now=datetime(2026, 11, 29, 0, 20, tzinfo=UTC), final_after=FINAL_AFTER)

    assert days == [date(2026, 11, 28), date(2026, 11, 29)]
    assert BillingCursor.objects.get(name="usage_rollup").through == date(2026, 11, 28)
    day_2 = UsageDailyRollup.objects.get(day=date(2026, 11, 28))
    assert (day_2.requests, day_2.cost_usd) == (2, Decimal("0.0070"))


def test_recomputing_a_day_repairs_its_rows(usage):
    usage_rollup(now=datetime(2026, 11, 29, 1, tzinfo=UTC), final_after=FINAL_AFTER)
    good = rollups()
    row = UsageDailyRollup.objects.filter(day=date(2026, 11, 27)).order_by("pk")[0]
    UsageDailyRollup.objects.filter(pk=row.pk).update(requests=99)
    org, _, key, _, _ = usage
    UsageDailyRollup.objects.create(
        organization=org, api_key=key, model="ghost", day=date(2026, 11, 27), requests=1
    )

    usage_rollup_day(day=date(2026, 11, 27))

    assert rollups() == good


def test_nothing_to_roll_up_without_usage():
    assert usage_rollup(final_after=FINAL_AFTER) == []
    assert not UsageDailyRollup.objects.exists()
