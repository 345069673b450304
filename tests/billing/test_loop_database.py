"""Reservation and settlement on the event loop's own connections (billing/loop_database.py):
the same statements and outcomes as the sync services, with no thread and no ORM (an ORM call
from the running loop would raise SynchronousOnlyOperation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from django.db import OperationalError, connection

from billing import loop_database
from billing.models import Account, KeySpend, SpendCap, UsageRecord
from billing.money import usage_cost_usd
from billing.selectors import wallet_balance_usd
from billing.services import (
    CapTerms,
    InsufficientCredit,
    SpendCapExceeded,
    credit_reserve,
    credit_reserve_on_loop,
    usage_settle,
    usage_settle_on_loop,
)
from tests.billing.test_ledger import PRICE, metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db(transaction=True)

CAP = CapTerms(amount_usd=Decimal("5"), window=SpendCap.Window.MONTH)
COST = usage_cost_usd(price=PRICE, input_tokens=1000, output_tokens=2000)
_R = TypeVar("_R")


def on_a_loop(step: Callable[[], Awaitable[_R]]) -> _R:
    async def scenario() -> _R:
        return await step()

    return asyncio.run(scenario())


def reserve_kwargs(org: Any, key: Any, request_id: str, amount: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "organization_id": org.pk,
        "api_key_id": key.pk,
        "amount_usd": Decimal(amount),
        "spend_cap": CAP,
    }


def used_key(credit_usd: str = "10") -> tuple[Any, Any]:
    """A capped key whose spend window and accounts exist (made by the sync services)."""
    org = make_org(credit_usd=credit_usd)
    key, _ = make_key(org)
    credit_reserve(**reserve_kwargs(org, key, f"req_first_{org.pk}", "0.01"))
    usage_settle(metered=metered(key.pk, org.pk, request_id=f"req_first_{org.pk}"))
    return org, key


def test_it_reserves_and_settles_on_the_loop():
    org, key = used_key()
    other_org, other_key = used_key()

    async def request() -> tuple[Any, Any]:
        held = await credit_reserve_on_loop(**reserve_kwargs(org, key, "req_1", "1"))
        settled = await usage_settle_on_loop(metered=metered(key.pk, org.pk, request_id="req_1"))
        return held, settled

    held, settled = on_a_loop(request)

    assert held is not None and held.amount_usd == Decimal("1")
    assert settled is not None and settled.cost_usd == COST
    assert UsageRecord.objects.get(request_id="req_1").cost_usd == COST
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - 2 * COST
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0
    window = KeySpend.objects.get(api_key=key)
    assert (window.spent_usd, window.reserved_usd) == (2 * COST, 0)
    assert wallet_balance_usd(organization_id=other_org.pk) == Decimal("10") - COST
    assert KeySpend.objects.get(api_key=other_key).spent_usd == COST


def test_a_wallet_refusal_on_the_loop_holds_nothing():
    org, key = used_key(credit_usd="1")

    with pytest.raises(InsufficientCredit):
        on_a_loop(lambda: credit_reserve_on_loop(**reserve_kwargs(org, key, "req_1", "2")))

    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0
    assert KeySpend.objects.get(api_key=key).reserved_usd == 0


def test_refusals_on_the_loop_leave_no_prepared_statement_behind():
    org, key = used_key(credit_usd="1")

    async def refusals_then_a_request() -> list[str]:
        for number in range(3):  # the window fits, the wallet refuses: aborted on purpose
            with pytest.raises(InsufficientCredit):
                await credit_reserve_on_loop(**reserve_kwargs(org, key, f"req_{number}", "2"))
        await credit_reserve_on_loop(**reserve_kwargs(org, key, "req_fits", "0.1"))
        connections = loop_database.loop_connections()
        assert connections is not None
        async with connections.connection() as session:
            cursor = await session.execute("SELECT statement FROM pg_prepared_statements")
            return [statement for (statement,) in await cursor.fetchall()]

    prepared = on_a_loop(refusals_then_a_request)

    assert sum("INSERT INTO billing_reservation" in statement for statement in prepared) == 1


def test_a_spend_cap_refusal_on_the_loop_holds_nothing():
    org, key = used_key(credit_usd="100")

    with pytest.raises(SpendCapExceeded):
        on_a_loop(lambda: credit_reserve_on_loop(**reserve_kwargs(org, key, "req_1", "6")))

    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0


def test_a_windows_first_use_is_left_to_the_sync_service():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)

    held = on_a_loop(lambda: credit_reserve_on_loop(**reserve_kwargs(org, key, "req_1", "1")))

    assert held is None
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0


def test_a_request_settled_already_is_left_to_the_sync_service_and_charged_once():
    org, key = used_key()
    request = metered(key.pk, org.pk, request_id=f"req_first_{org.pk}")

    again = on_a_loop(lambda: usage_settle_on_loop(metered=request))

    assert again is None  # usage_settle answers the first record
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST


def _sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        (count,) = cursor.fetchone()
    return int(count)


def test_the_loops_connections_are_closed_when_it_ends():
    org, key = used_key()
    before = _sessions()

    async def concurrent_requests() -> None:
        await asyncio.gather(
            *(
                credit_reserve_on_loop(**reserve_kwargs(org, key, f"req_{number}", "0.1"))
                for number in range(4)
            )
        )

    on_a_loop(concurrent_requests)

    # A closed session's server process leaves pg_stat_activity a moment after the client.
    deadline = time.monotonic() + 10
    while _sessions() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sessions() == before


def test_after_a_connection_failure_the_loop_leaves_the_work_to_the_sync_service(monkeypatch):
    org, key = used_key()
    real_params = loop_database._connection_params
    # Nothing listens on port 1: connecting fails at once.
    monkeypatch.setattr(loop_database, "_connection_params", lambda: {**real_params(), "port": 1})

    async def two_requests() -> Any:
        with pytest.raises(OperationalError):
            await credit_reserve_on_loop(**reserve_kwargs(org, key, "req_1", "1"))
        monkeypatch.setattr(loop_database, "_connection_params", real_params)
        # The loop's connections rest: the next request goes to the sync service at once.
        return await credit_reserve_on_loop(**reserve_kwargs(org, key, "req_2", "1"))

    assert on_a_loop(two_requests) is None
