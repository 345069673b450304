"""No overdraft under concurrency: many requests, several gateway processes, one wallet."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx

from billing.models import Account, KeySpend, Reservation, SpendCap
from billing.money import USD_QUANTUM, Price, usage_cost_usd
from tests.factories import make_key, make_org

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))
REQUESTS = 200
ADMITTED = 37
MAX_TOKENS = 100


# Every test sends the same request; its worst case is what each request holds.
BODY = json.dumps(
    {
        "model": "fake-small",
        "messages": [{"role": "user", "content": "count the money twice"}],
        "max_tokens": MAX_TOKENS,
    }
).encode()
WORST_CASE_USD = usage_cost_usd(price=PRICE, input_tokens=len(BODY), output_tokens=MAX_TOKENS)


async def _send_all(urls: list[str], key: str, body: bytes, count: int = REQUESTS) -> list[int]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(n: int) -> int:
            response = await client.post(
                f"{urls[n % len(urls)]}/chat/completions",
                content=body,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            return response.status_code

        return await asyncio.gather(*(one(n) for n in range(count)))


def test_a_wallet_that_fits_k_worst_cases_admits_exactly_k(
    gateway_processes, catalog, fake_provider
):
    body, worst = BODY, WORST_CASE_USD
    # Each admitted request really costs its worst case, so no hold is ever freed for another:
    # the outcome cannot depend on timing. One unit short of K + 1 worst cases.
    fake_provider.reported_usage = (len(body), MAX_TOKENS)
    fake_provider.latency = 0.05
    org = make_org(credit_usd=str(worst * (ADMITTED + 1) - USD_QUANTUM))
    _, key = make_key(org)
    bystander = make_org(credit_usd="3")

    statuses = asyncio.run(_send_all(gateway_processes.urls, key, body))

    assert statuses.count(200) == ADMITTED, statuses
    assert statuses.count(402) == REQUESTS - ADMITTED
    wallet = Account.objects.get(organization=org, kind=Account.Kind.WALLET)
    assert wallet.balance_usd == worst - USD_QUANTUM
    assert wallet.reserved_usd == 0
    assert Reservation.objects.filter(state=Reservation.State.SETTLED).count() == ADMITTED
    assert len(fake_provider.calls) == ADMITTED
    assert Account.objects.get(organization=bystander).balance_usd == Decimal(3)


def test_a_provider_reporting_more_than_the_worst_case_cannot_overdraw_the_wallet(
    start_gateways, catalog, fake_provider
):
    body, worst = BODY, WORST_CASE_USD
    # A provider that ignores max_tokens, or misreports: far more than the request could use.
    fake_provider.reported_usage = (len(body), 100 * MAX_TOKENS)
    org = make_org(credit_usd=str(worst * 5))
    _, key = make_key(org)

    statuses = asyncio.run(_send_all(start_gateways(2).urls, key, body, count=20))

    # Each request is charged at most what it held: exactly five fit, and the wallet is spent.
    assert statuses.count(200) == 5, statuses
    wallet = Account.objects.get(organization=org, kind=Account.Kind.WALLET)
    assert wallet.balance_usd == 0
    assert wallet.reserved_usd == 0


def test_a_spend_cap_that_fits_k_worst_cases_admits_exactly_k_across_processes(
    start_gateways, catalog, fake_provider
):
    body, worst = BODY, WORST_CASE_USD
    fake_provider.reported_usage = (len(body), MAX_TOKENS)  # each costs its whole hold
    fake_provider.latency = 0.05
    org = make_org(credit_usd="10")  # the wallet is not what refuses
    api_key, key = make_key(org)
    SpendCap.objects.create(api_key=api_key, amount_usd=worst * 3, window="day")
    other_key, other = make_key(org)
    SpendCap.objects.create(api_key=other_key, amount_usd=worst, window="day")

    gateways = start_gateways(2)
    statuses = asyncio.run(_send_all(gateways.urls, key, body, count=50))

    assert statuses.count(200) == 3, statuses
    assert statuses.count(402) == 47
    spend = KeySpend.objects.get(api_key=api_key)
    assert (spend.spent_usd, spend.reserved_usd) == (worst * 3, 0)
    # Another key's cap is its own.
    assert asyncio.run(_send_all(gateways.urls, other, body, count=1)) == [200]
