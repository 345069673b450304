"""The one reading of a usage query (`?key=&model=&status=&since=&until=&period=&group_by=`),
shared by the usage pages, the CSV export and the management API so they filter alike."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from django import forms
from django.http import QueryDict
from django.utils import timezone

from billing.models import UsageRecord
from billing.usage import GROUPS, PERIODS, GroupBy, Period, UsageFilter, period_start

# How far back a chart looks when no `since` is given.
DEFAULT_SPAN = {
    "day": timedelta(days=30),
    "week": timedelta(weeks=12),
    "month": timedelta(days=365),
}


# Bounds that keep every range computable (and a day-by-day chart drawable).
EARLIEST, LATEST = date(2000, 1, 1), date(2999, 12, 31)
MAX_SPAN_DAYS = 3660


class UsageQueryForm(forms.Form):
    key = forms.IntegerField(required=False, min_value=1, max_value=2**63 - 1, label="API key")
    model = forms.CharField(required=False, max_length=200)
    status = forms.ChoiceField(required=False, choices=[("", "any"), *UsageRecord.Status.choices])
    since = forms.DateField(required=False, help_text="From this day (UTC), inclusive.")
    until = forms.DateField(required=False, help_text="To this day (UTC), inclusive.")
    period = forms.ChoiceField(required=False, choices=[(p, p) for p in PERIODS])
    group_by = forms.ChoiceField(required=False, choices=[(g, g) for g in GROUPS])

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        for day in (since, until):
            if day and not EARLIEST <= day <= LATEST:
                raise forms.ValidationError(f"Dates must be from {EARLIEST} to {LATEST}.")
        # A range without `until` ends today (chart_range), and is held to the same bounds.
        last = until or timezone.now().astimezone(UTC).date()
        if since and since > last:
            raise forms.ValidationError(
                "'since' must not be after 'until' (today when it is not given)."
            )
        if since and (last - since).days > MAX_SPAN_DAYS:
            raise forms.ValidationError(f"At most {MAX_SPAN_DAYS} days at a time.")
        return data


def _day_start(day: object) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)  # type: ignore[arg-type]


def usage_query(params: QueryDict) -> UsageQueryForm:
    """The bound form; check `is_valid()` and answer its errors."""
    return UsageQueryForm(params)


def usage_filter(form: UsageQueryForm) -> UsageFilter:
    """The filter of a valid form (`until` becomes the start of the next day: exclusive)."""
    data = form.cleaned_data
    return UsageFilter(
        api_key_id=data.get("key"),
        model=data.get("model") or "",
        status=data.get("status") or "",
        since=_day_start(data["since"]) if data.get("since") else None,
        until=_day_start(data["until"]) + timedelta(days=1) if data.get("until") else None,
    )


def chart_range(
    form: UsageQueryForm, period: Period, *, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The span a chart shows: the form's dates, or the default span up to today."""
    chosen = usage_filter(form)
    today = (now or timezone.now()).astimezone(UTC).date()
    until = chosen.until or _day_start(today) + timedelta(days=1)
    # A default start is moved back to its period's first day: the first bucket, labelled with
    # that day, then sums the whole period, as every other bucket does.
    since = chosen.since or _day_start(
        period_start(period=period, day=(until - DEFAULT_SPAN[period]).date())
    )
    return since, until


def period_of(form: UsageQueryForm) -> Period:
    value = form.cleaned_data.get("period") or "day"
    return next(period for period in PERIODS if period == value)


def group_by_of(form: UsageQueryForm) -> GroupBy:
    value = form.cleaned_data.get("group_by") or "model"
    return next(group for group in GROUPS if group == value)
