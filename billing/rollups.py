"""Daily usage rollups: usage records summed per organisation × key × model × UTC day.

A day is recomputed whole and upserted, so re-running changes nothing, and a crash between
days loses nothing: the cursor (`BillingCursor` "usage_rollup") only moves past a day once
its rows are committed and final.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from django.db import transaction
from django.db.models import Count, Min, Sum
from django.utils import timezone

from billing.models import BillingCursor, UsageDailyRollup, UsageRecord

CURSOR = "usage_rollup"
_SUMMED = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_input_tokens")


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def usage_rollup_day(*, day: date) -> int:
    """Recompute one UTC day's rollups from its usage records; returns how many rows it has.

    One transaction: the day's rows are upserted and rows of groups no longer present (none
    in an append-only history, but a recomputation must not keep them) are deleted.
    """
    start, end = _day_bounds(day)
    groups = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .values("organization_id", "api_key_id", "model")
        .annotate(
            requests=Count("pk"),
            cost_usd=Sum("cost_usd"),
            **{field: Sum(field) for field in _SUMMED},
        )
        .order_by()
    )
    rows = [
        UsageDailyRollup(
            organization_id=group["organization_id"],
            api_key_id=group["api_key_id"],
            model=group["model"],
            day=day,
            requests=group["requests"],
            cost_usd=group["cost_usd"],
            **{field: group[field] for field in _SUMMED},
        )
        for group in groups
    ]
    with transaction.atomic():
        UsageDailyRollup.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["organization", "api_key", "model", "day"],
            update_fields=["requests", "cost_usd", *_SUMMED],
        )
        kept = {(row.organization_id, row.api_key_id, row.model) for row in rows}
        for pk, organization_id, api_key_id, model in UsageDailyRollup.objects.filter(
            day=day
        ).values_list("pk", "organization_id", "api_key_id", "model"):
            if (organization_id, api_key_id, model) not in kept:
                UsageDailyRollup.objects.filter(pk=pk).delete()
    return len(rows)


def usage_rollup(*, now: datetime | None = None, final_after: timedelta) -> list[date]:
    """Roll up every day from the cursor to today; returns the days recomputed.

    A day is final once `final_after` has passed since its end (a request settled just before
    midnight may commit a little after it); the cursor moves only over final days, one commit
    per day, so a crash resumes at the first day not yet final. Days after the cursor, today
    included, are recomputed on every run.
    """
    now = (now or timezone.now()).astimezone(UTC)
    today = now.date()
    cursor = BillingCursor.objects.filter(name=CURSOR).first()
    if cursor is not None:
        first = cursor.through + timedelta(days=1)
    else:
        earliest = UsageRecord.objects.aggregate(first=Min("created_at"))["first"]
        if earliest is None:
            return []
        first = earliest.astimezone(UTC).date()
    recomputed = []
    day = first
    while day <= today:
        usage_rollup_day(day=day)
        recomputed.append(day)
        if _day_bounds(day)[1] + final_after <= now:
            BillingCursor.objects.update_or_create(name=CURSOR, defaults={"through": day})
        day += timedelta(days=1)
    return recomputed
