"""Build test objects through the real services, so tests exercise the code users run."""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime
from decimal import Decimal

from billing.models import UsageRecord
from billing.money import Price
from billing.services import MeteredRequest, credit_grant, usage_settle
from portal.models import ApiKey, Organization
from portal.services import api_key_create, organization_create

_sequence = itertools.count(1)


def make_org(*, name: str | None = None, credit_usd: str | None = "10") -> Organization:
    n = next(_sequence)
    organization = organization_create(name=name or f"Org {n}", owner_email=f"owner{n}@example.com")
    if credit_usd is not None:
        credit_grant(
            organization=organization, amount_usd=Decimal(credit_usd), reason="test credit"
        )
    return organization


def make_key(organization: Organization, *, name: str = "test key") -> tuple[ApiKey, str]:
    return api_key_create(organization=organization, name=name)


def make_usage(
    api_key: ApiKey,
    *,
    model: str = "fake-small",
    input_tokens: int = 1000,
    output_tokens: int = 500,
    status: str = "ok",
    at: datetime | None = None,
    request_id: str | None = None,
) -> UsageRecord:
    """A settled request charged through the real service (prices: $0.50 / $1.50 per 1M).

    `at` back-dates it (created_at is set by the database, so it is moved afterwards);
    `request_id` settles a reservation made with that id.
    """
    record = usage_settle(
        metered=MeteredRequest(
            request_id=request_id or f"req-{uuid.uuid4().hex}",
            api_key_id=api_key.pk,
            organization_id=api_key.organization_id,
            model=model,
            provider="fake",
            upstream_model=f"{model}-upstream",
            status=UsageRecord.Status(status),
            http_status=200 if status != "upstream_error" else 502,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=0,
            usage_source=UsageRecord.UsageSource.REPORTED,
            latency_ms=42,
            price=Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50")),
        )
    )
    if at is not None:
        UsageRecord.objects.filter(pk=record.pk).update(created_at=at)
        record.refresh_from_db()
    return record
