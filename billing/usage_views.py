"""Usage pages: spend and tokens over time (charts), the request log, and its CSV export.

Each page is about the dashboard's current organisation (`?org=`); members see their own keys'
usage, owners and admins every key's. The filters are the management API's (usage_filters.py).
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, time
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render

from billing.models import UsageRecord
from billing.money import ZERO_USD, format_usd
from billing.usage import (
    UsageFilter,
    period_starts,
    usage_models,
    usage_records,
    usage_series,
)
from billing.usage_filters import (
    UsageQueryForm,
    chart_range,
    group_by_of,
    period_of,
    usage_filter,
    usage_query,
)
from portal.dashboard import current_membership
from portal.models import ApiKey, Membership
from portal.permissions import Action, can
from portal.selectors import api_keys_manageable

LOG_PAGE_SIZE = 50
CSV_COLUMNS = [
    "created_at",
    "request_id",
    "api_key",
    "model",
    "provider",
    "status",
    "http_status",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "usage_source",
    "cost_usd",
    "latency_ms",
]


def _visible_keys(membership: Membership) -> QuerySet[ApiKey] | None:
    if can(membership, Action.USAGE_VIEW_ALL):
        return None
    return api_keys_manageable(membership=membership)


def _keys_for_menu(membership: Membership) -> QuerySet[ApiKey]:
    return api_keys_manageable(membership=membership)


def _filtered(request: HttpRequest) -> tuple[Membership, UsageQueryForm, QuerySet[UsageRecord]]:
    """The member, the bound filter form, and the records it selects (none if it is invalid)."""
    membership = current_membership(request)
    form = usage_query(request.GET)
    records = usage_records(
        organization_id=membership.organization_id,
        visible_keys=_visible_keys(membership),
        filter=usage_filter(form) if form.is_valid() else UsageFilter(),
    )
    if not form.is_valid():
        records = records.none()
    return membership, form, records


@login_required
def usage_page(request: HttpRequest) -> HttpResponse:
    """Spend and tokens per day, week or month, by model or by key, as charts and a table."""
    membership, form, records = _filtered(request)
    context: dict[str, Any] = {
        "organization": membership.organization,
        "form": form,
        "keys": _keys_for_menu(membership),
        "models": usage_models(records=records) if form.is_valid() else [],
    }
    if form.is_valid():
        period, group_by = period_of(form), group_by_of(form)
        since, until = chart_range(form, period)
        chosen = replace(usage_filter(form), since=since, until=until)
        ranged = usage_records(
            organization_id=membership.organization_id,
            visible_keys=_visible_keys(membership),
            filter=chosen,
        )
        buckets = usage_series(records=ranged, period=period, group_by=group_by)
        starts = period_starts(period=period, since=since, until=until)
        groups = sorted({bucket.group for bucket in buckets})
        cell = {(bucket.period_start, bucket.group): bucket for bucket in buckets}
        chart = {
            "x": [int(datetime.combine(d, time.min, tzinfo=UTC).timestamp()) for d in starts],
            "series": [
                {
                    "label": group,
                    "cost_usd": [
                        format_usd(cell[(d, group)].cost_usd) if (d, group) in cell else "0"
                        for d in starts
                    ],
                    "tokens": [
                        (cell[(d, group)].input_tokens + cell[(d, group)].output_tokens)
                        if (d, group) in cell
                        else 0
                        for d in starts
                    ],
                }
                for group in groups
            ],
        }
        context.update(
            period=period,
            group_by=group_by,
            since=since,
            until=until,
            buckets=buckets,
            chart=chart,
            total_cost_usd=format_usd(sum((b.cost_usd for b in buckets), ZERO_USD)),
            total_tokens=sum(b.input_tokens + b.output_tokens for b in buckets),
            total_requests=sum(b.requests for b in buckets),
        )
    return render(request, "billing/usage.html", context)


@login_required
def usage_log_page(request: HttpRequest) -> HttpResponse:
    """The request log, newest first, filtered and paginated."""
    membership, form, records = _filtered(request)
    page = Paginator(records, LOG_PAGE_SIZE).get_page(request.GET.get("page"))
    keys = _keys_for_menu(membership)
    labels = {
        pk: f"{name} ({prefix}…)"
        for pk, name, prefix in ApiKey.objects.filter(
            pk__in={record.api_key_id for record in page}
        ).values_list("pk", "name", "prefix")
    }
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "billing/usage_log.html",
        {
            "organization": membership.organization,
            "form": form,
            "keys": keys,
            "models": usage_models(records=records) if form.is_valid() else [],
            "page": page,
            "rows": [(record, labels.get(record.api_key_id, "?")) for record in page],
            "query": query.urlencode(),
        },
    )


class _Echo:
    """A file-like object whose write returns the line, for csv.writer in a streamed response."""

    def write(self, value: str) -> str:
        return value


def _csv_lines(records: QuerySet[UsageRecord], labels: dict[int, str]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for record in records.iterator(chunk_size=2000):
        yield writer.writerow(
            [
                record.created_at.isoformat(),
                record.request_id,
                labels.get(record.api_key_id, str(record.api_key_id)),
                record.model,
                record.provider,
                record.status,
                record.http_status,
                record.input_tokens,
                record.output_tokens,
                record.cached_input_tokens,
                record.cache_write_input_tokens,
                record.usage_source,
                format_usd(record.cost_usd),
                record.latency_ms,
            ]
        )


# Rows fetched from the database per hop into the ORM's thread while the export streams.
CSV_ROWS_PER_CHUNK = 500


async def _served_async(lines: Iterator[str]) -> AsyncIterator[str]:
    """The CSV lines for an ASGI server, CSV_ROWS_PER_CHUNK at a time. A sync iterator would
    be read whole into memory by Django's ASGI handler before the first byte went out."""
    next_chunk = sync_to_async(lambda: list(itertools.islice(lines, CSV_ROWS_PER_CHUNK)))
    while chunk := await next_chunk():
        yield "".join(chunk)


# A cell starting with one of these is run as a formula by spreadsheets (OWASP's "CSV
# injection"); a leading apostrophe makes them show it as text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_text(value: str) -> str:
    """A cell anyone in the organisation wrote (a key's name), safe to open in a spreadsheet."""
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


@login_required
def usage_log_csv(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    """The request log with the page's filters, as CSV, streamed row by row (no page limit)."""
    membership, form, records = _filtered(request)
    if not form.is_valid():
        return HttpResponse(
            "Invalid filter: "
            + "; ".join(f"{k}: {' '.join(str(e) for e in v)}" for k, v in form.errors.items()),
            status=400,
            content_type="text/plain; charset=utf-8",
        )
    labels = {
        pk: _spreadsheet_text(f"{name} ({prefix})")
        for pk, name, prefix in ApiKey.objects.filter(
            organization_id=membership.organization_id
        ).values_list("pk", "name", "prefix")
    }
    response = StreamingHttpResponse(
        _served_async(_csv_lines(records, labels)), content_type="text/csv"
    )
    filename = f"switchboard-requests-{membership.organization.slug}.csv"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
