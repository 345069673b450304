"""The usage query's default chart range (billing/usage_filters.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.http import QueryDict

from billing.usage_filters import chart_range, usage_query

WEDNESDAY_NOV_18 = datetime(2026, 11, 18, 10, tzinfo=UTC)


def default_range(period: str, now: datetime) -> tuple[datetime, datetime]:
    form = usage_query(QueryDict(f"period={period}"))
    assert form.is_valid()
    return chart_range(form, period, now=now)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("period", "since"),
    [
        # 30 days back from tomorrow: days are whole anyway.
        ("day", datetime(2026, 10, 20, tzinfo=UTC)),
        # 12 weeks back lands on a Thursday: the chart starts on that week's Monday, or its
        # first week's bucket (labelled with the Monday) would hold only part of the week.
        ("week", datetime(2026, 8, 24, tzinfo=UTC)),
        # 365 days back lands on 19 November 2025: the chart starts on the 1st, or November
        # 2025's bucket would show only its last 12 days of spend.
        ("month", datetime(2025, 11, 1, tzinfo=UTC)),
    ],
)
def test_without_since_the_chart_starts_on_a_whole_period(period, since):
    assert default_range(period, WEDNESDAY_NOV_18) == (since, datetime(2026, 11, 19, tzinfo=UTC))


def test_a_given_since_is_kept_as_asked():
    form = usage_query(QueryDict("period=month&since=2026-03-05&until=2026-03-31"))
    assert form.is_valid()

    assert chart_range(form, "month", now=WEDNESDAY_NOV_18) == (
        datetime(2026, 3, 5, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("query", "error"),
    [
        # Without `until` the range ends today: the same bounds hold as with one.
        ("since=2000-01-01", "At most 3660 days at a time."),
        ("since=2999-12-31", "'since' must not be after 'until' (today when it is not given)."),
        (
            "since=2026-03-05&until=2026-03-01",
            "'since' must not be after 'until' (today when it is not given).",
        ),
        ("since=2000-01-01&until=2026-11-18", "At most 3660 days at a time."),
    ],
)
def test_an_open_until_is_today_for_the_range_checks(query, error, monkeypatch):
    monkeypatch.setattr("django.utils.timezone.now", lambda: WEDNESDAY_NOV_18)
    form = usage_query(QueryDict(query))

    assert not form.is_valid()
    assert form.errors["__all__"] == [error]


def test_a_since_up_to_today_without_until_is_valid(monkeypatch):
    monkeypatch.setattr("django.utils.timezone.now", lambda: WEDNESDAY_NOV_18)

    assert usage_query(QueryDict("since=2026-11-18")).is_valid()
    assert usage_query(QueryDict("since=2016-11-20")).is_valid()
