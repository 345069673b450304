"""Assertions shared by the end-to-end gateway tests: a call was charged exactly right."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai

from billing.models import UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from portal.models import Organization


def sdk(gateway_url: str, key: str) -> openai.OpenAI:
    """The official client pointed at the gateway, without retries (tests count calls)."""
    return openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)


def assert_charged_exactly(
    raw: Any,
    organization: Organization,
    *,
    price: Price,
    input_tokens: int,
    output_tokens: int,
    provider: str,
    upstream_model: str,
    credit_usd: Decimal = Decimal(10),
) -> None:
    """The response `raw` (a with_raw_response result) was recorded and charged to the unit."""
    expected_cost = usage_cost_usd(
        price=price, input_tokens=input_tokens, output_tokens=output_tokens
    )
    assert expected_cost > 0
    assert Decimal(raw.headers["x-switchboard-cost-usd"]) == expected_cost
    assert wallet_balance_usd(organization_id=organization.pk) == credit_usd - expected_cost
    record = UsageRecord.objects.get(request_id=raw.headers["x-request-id"])
    assert (record.input_tokens, record.output_tokens) == (input_tokens, output_tokens)
    assert record.cost_usd == expected_cost
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert (record.provider, record.upstream_model) == (provider, upstream_model)
    assert record.status == UsageRecord.Status.OK
    assert record.organization_id == organization.pk
