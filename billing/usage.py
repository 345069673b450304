"""Reads of usage: the request log, spend and tokens over time, and one key's spend.

Every read starts from `usage_records`, which takes the organisation and the keys the caller
may see, so no query here can reach another tenant's rows. Amounts are exact Decimal sums.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Literal

from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDay, TruncMonth, TruncWeek

from billing.models import KeySpend, SpendCap, UsageRecord
from billing.money import ZERO_USD
from billing.services import spend_window_bounds
from portal.models import ApiKey

Period = Literal["day", "week", "month"]
GroupBy = Literal["model", "key"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
GROUPS: tuple[GroupBy, ...] = ("model", "key")
_TRUNC = {"day": TruncDay, "week": TruncWeek, "month": TruncMonth}


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which requests: all fields optional; `until` is exclusive."""

    api_key_id: int | None = None
    model: str = ""
    status: str = ""
    since: datetime | None = None
    until: datetime | None = None


def usage_records(
    *, organization_id: int, visible_keys: QuerySet[ApiKey] | None, filter: UsageFilter
) -> QuerySet[UsageRecord]:
    """The organisation's usage records that pass the filter, newest first.

    `visible_keys`: the keys the caller may see (a member's own), or None for every key.
    """
    records = UsageRecord.objects.filter(organization_id=organization_id)
    if visible_keys is not None:
        records = records.filter(api_key_id__in=visible_keys.values("pk"))
    if filter.api_key_id is not None:
        records = records.filter(api_key_id=filter.api_key_id)
    if filter.model:
        records = records.filter(model=filter.model)
    if filter.status:
        records = records.filter(status=filter.status)
    if filter.since is not None:
        records = records.filter(created_at__gte=filter.since)
    if filter.until is not None:
        records = records.filter(created_at__lt=filter.until)
    return records.order_by("-created_at", "-pk")


@dataclass(frozen=True, slots=True)
class UsageBucket:
    period_start: date
    group: str  # the model name, or the key's "name (prefix…)"
    api_key_id: int | None
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


def usage_series(
    *, records: QuerySet[UsageRecord], period: Period, group_by: GroupBy
) -> list[UsageBucket]:
    """Requests, tokens and spend per period (UTC) and per model or key, oldest first."""
    group_field = "model" if group_by == "model" else "api_key_id"
    rows = (
        records.order_by()
        .annotate(bucket=_TRUNC[period]("created_at", tzinfo=UTC))
        .values("bucket", group_field)
        .annotate(
            requests=Count("pk"),
            input=Coalesce(Sum("input_tokens"), 0),
            output=Coalesce(Sum("output_tokens"), 0),
            cost=Coalesce(Sum("cost_usd"), ZERO_USD),
        )
        .order_by("bucket", group_field)
    )
    key_names: dict[int, str] = {}
    if group_by == "key":
        key_names = {
            pk: f"{name} ({prefix}…)"
            for pk, name, prefix in ApiKey.objects.filter(
                pk__in={row["api_key_id"] for row in rows}
            ).values_list("pk", "name", "prefix")
        }
    return [
        UsageBucket(
            period_start=row["bucket"].date(),
            group=row["model"] if group_by == "model" else key_names.get(row["api_key_id"], "?"),
            api_key_id=None if group_by == "model" else row["api_key_id"],
            requests=row["requests"],
            input_tokens=row["input"],
            output_tokens=row["output"],
            cost_usd=row["cost"],
        )
        for row in rows
    ]


def period_start(*, period: Period, day: date) -> date:
    """The first day of the period (UTC day, Monday-started week, month) containing `day`."""
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day


def period_starts(*, period: Period, since: datetime, until: datetime) -> list[date]:
    """Every period start (UTC) from the one containing `since` to the one before `until`."""
    day = period_start(period=period, day=since.astimezone(UTC).date())
    last = (until - timedelta(microseconds=1)).astimezone(UTC).date()
    starts: list[date] = []
    while day <= last:
        starts.append(day)
        if period == "day":
            day += timedelta(days=1)
        elif period == "week":
            day += timedelta(weeks=1)
        else:
            day = (day + timedelta(days=32)).replace(day=1)
    return starts


def usage_models(*, records: QuerySet[UsageRecord]) -> list[str]:
    """The model names that appear in these records, sorted (for filter menus)."""
    return sorted(set(records.order_by().values_list("model", flat=True).distinct()))


@dataclass(frozen=True, slots=True)
class KeySpendSummary:
    """One API key's spend: in its cap window (if it has a cap) and in total."""

    total_spent_usd: Decimal
    total_requests: int
    cap_usd: Decimal | None
    cap_window: str | None
    window_start: datetime | None
    window_resets_at: datetime | None
    window_spent_usd: Decimal | None
    window_reserved_usd: Decimal | None
    remaining_usd: Decimal | None  # what the cap still allows; None without a cap


def key_spend_summary(*, api_key: ApiKey, now: datetime) -> KeySpendSummary:
    totals = UsageRecord.objects.filter(api_key_id=api_key.pk).aggregate(
        spent=Coalesce(Sum("cost_usd"), ZERO_USD), requests=Count("pk")
    )
    cap = SpendCap.objects.filter(api_key_id=api_key.pk).first()
    if cap is None:
        return KeySpendSummary(
            total_spent_usd=totals["spent"],
            total_requests=totals["requests"],
            cap_usd=None,
            cap_window=None,
            window_start=None,
            window_resets_at=None,
            window_spent_usd=None,
            window_reserved_usd=None,
            remaining_usd=None,
        )
    start, resets_at = spend_window_bounds(SpendCap.Window(cap.window), now)
    spend = KeySpend.objects.filter(api_key_id=api_key.pk, window_start=start).first()
    spent = spend.spent_usd if spend else ZERO_USD
    reserved = spend.reserved_usd if spend else ZERO_USD
    return KeySpendSummary(
        total_spent_usd=totals["spent"],
        total_requests=totals["requests"],
        cap_usd=cap.amount_usd,
        cap_window=cap.window,
        window_start=start,
        window_resets_at=resets_at,
        window_spent_usd=spent,
        window_reserved_usd=reserved,
        remaining_usd=max(ZERO_USD, cap.amount_usd - spent - reserved),
    )


def key_labels(*, keys: Iterable[ApiKey]) -> dict[int, str]:
    return {key.pk: f"{key.name} ({key.prefix}…)" for key in keys}
