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
from django.db.models import Model
from django.db.models.signals import post_init

from billing import hot_path_sql, loop_database
from billing.models import Account, KeySpend, Posting, Reservation, SpendCap, UsageRecord
from billing.money import usage_cost_usd
from billing.selectors import wallet_balance_usd
from billing.services import (
    CapTerms,
    InsufficientCredit,
    SpendCapExceeded,
    credit_reserve,
    credit_reserve_on_loop,
    reservation_void,
    usage_settle,
    usage_settle_on_loop,
)
from tests.billing.test_ledger import PRICE, assert_ledger_balanced, metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _one_statement_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batches below are told apart for this setting (the one shipped)."""
    monkeypatch.setattr(loop_database, "BATCHES_IN_FLIGHT", 1)


CAP = CapTerms(amount_usd=Decimal("5"), window=SpendCap.Window.MONTH)
COST = usage_cost_usd(price=PRICE, input_tokens=1000, output_tokens=2000)
_R = TypeVar("_R")


def batch_sizes(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """The sizes of the batches that hot_path_sql's `name` ("reserve", "settle") is given."""
    sizes: list[int] = []
    real = getattr(hot_path_sql, name)

    def counted(values: list[Any]) -> Any:
        sizes.append(len(values))
        return real(values)

    monkeypatch.setattr(hot_path_sql, name, counted)
    return sizes


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


async def reserved_and_settled(org: Any, key: Any, request_id: str) -> tuple[Any, Any]:
    """A request's reservation of $1 and its settlement, on the running loop."""
    held = await credit_reserve_on_loop(**reserve_kwargs(org, key, request_id, "1"))
    settled = await usage_settle_on_loop(metered=metered(key.pk, org.pk, request_id=request_id))
    return held, settled


def test_it_reserves_and_settles_on_the_loop():
    org, key = used_key()
    other_org, other_key = used_key()

    held, settled = on_a_loop(lambda: reserved_and_settled(org, key, "req_1"))

    assert held is not None and held.amount_usd == Decimal("1")
    assert settled is not None and settled.cost_usd == COST
    assert UsageRecord.objects.get(request_id="req_1").cost_usd == COST
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - 2 * COST
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0
    window = KeySpend.objects.get(api_key=key)
    assert (window.spent_usd, window.reserved_usd) == (2 * COST, 0)
    assert wallet_balance_usd(organization_id=other_org.pk) == Decimal("10") - COST
    assert KeySpend.objects.get(api_key=other_key).spent_usd == COST


def field_values(instance: Model) -> dict[str, Any]:
    fields = type(instance)._meta.concrete_fields
    return {field.attname: getattr(instance, field.attname) for field in fields}


def test_the_answered_rows_are_the_stored_rows(django_assert_num_queries: Any) -> None:
    """What the one statement answers is made without a query: field by field, and in how it
    behaves (not adding, on the default database, its relations fetched on demand), it is the
    row the database holds."""
    org, key = used_key()

    held, settled = on_a_loop(lambda: reserved_and_settled(org, key, "req_1"))
    with django_assert_num_queries(0):  # a field left unset would be fetched
        answered = field_values(held), field_values(settled)

    assert answered[1] == field_values(UsageRecord.objects.get(request_id="req_1"))
    # The reservation as it was held (its id is not read back); settling it changed it since.
    assert answered[0] == {
        **field_values(Reservation.objects.get(request_id="req_1")),
        "id": None,
        "state": Reservation.State.HELD,
        "resolved_at": None,
    }
    for answered in (held, settled):
        assert (answered._state.adding, answered._state.db) == (False, "default")
        assert answered.organization == org and answered.api_key == key


def test_an_answered_row_is_made_by_django_when_something_listens_to_its_creation():
    org, key = used_key()
    seen: list[Any] = []

    def listener(sender: Any, instance: Any, **kwargs: Any) -> None:
        seen.append(instance)

    post_init.connect(listener, sender=Reservation)
    try:
        held = on_a_loop(lambda: credit_reserve_on_loop(**reserve_kwargs(org, key, "req_1", "1")))
    finally:
        post_init.disconnect(listener, sender=Reservation)

    assert held is not None and seen == [held]
    assert (held.amount_usd, held.state) == (Decimal("1"), Reservation.State.HELD)


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


def test_settlements_that_meet_on_the_loop_go_together_and_each_is_exact(monkeypatch):
    org, key = used_key(credit_usd="100")
    uncapped_org = make_org(credit_usd="100")
    uncapped_key, _ = make_key(uncapped_org)
    credit_reserve(
        **{**reserve_kwargs(uncapped_org, uncapped_key, "req_first", "0.01"), "spend_cap": None}
    )
    usage_settle(metered=metered(uncapped_key.pk, uncapped_org.pk, request_id="req_first"))
    sizes = batch_sizes(monkeypatch, "settle")

    requests = [(org, key, CAP), (uncapped_org, uncapped_key, None)] * 12

    async def settle(numbers: range, *also: Any) -> list[Any]:
        return await asyncio.gather(
            *(
                usage_settle_on_loop(metered=metered(used.pk, owner.pk, request_id=f"req_{number}"))
                for number, (owner, used, _) in enumerate(requests)
                if number in numbers
            ),
            *also,
        )

    async def scenario() -> tuple[list[Any], list[Any]]:
        for number, (owner, used, cap) in enumerate(requests):
            await credit_reserve_on_loop(
                **{**reserve_kwargs(owner, used, f"req_{number}", "0.1"), "spend_cap": cap}
            )
        together = await settle(range(20))
        # One settled already: its batch fails, and each of its values is sent again alone.
        again = usage_settle_on_loop(
            metered=metered(key.pk, org.pk, request_id=f"req_first_{org.pk}")
        )
        return together, await settle(range(20, 24), again)

    together, (*alone, again) = on_a_loop(scenario)

    # The first goes at once, alone; the others wait for it and go together.
    assert sizes == [1, 19, 1, 4, 1, 1, 1, 1]
    assert again is None
    settled = together + alone
    assert [record.request_id for record in settled] == [f"req_{number}" for number in range(24)]
    for record in settled:
        stored = UsageRecord.objects.get(request_id=record.request_id)
        assert (stored.pk, stored.ledger_transaction_id) == (
            record.pk,
            record.ledger_transaction_id,
        )
        charged = Posting.objects.get(transaction_id=stored.ledger_transaction_id, amount_usd__lt=0)
        assert charged.account.organization_id == stored.organization_id
    for owner in (org, uncapped_org):
        wallet = Account.objects.get(organization=owner, kind=Account.Kind.WALLET)
        assert (wallet.balance_usd, wallet.reserved_usd) == (Decimal("100") - 13 * COST, 0)
    window = KeySpend.objects.get(api_key=key)
    assert (window.spent_usd, window.reserved_usd) == (13 * COST, 0)
    assert_ledger_balanced()


def _reservations_in_batches(
    monkeypatch: pytest.MonkeyPatch, asks: list[tuple[Any, Any, str, CapTerms | None]]
) -> tuple[list[Any], list[int]]:
    """Reserve `asks` (organisation, key, amount, cap) at once on one loop, after one of
    another organisation's (which goes at once, alone, so that `asks` wait and go together);
    the outcomes of `asks` (a Reservation, None, or the error) and the batches' sizes."""
    other, other_key = used_key()
    sizes = batch_sizes(monkeypatch, "reserve")
    everything = [(other, other_key, "0.1", CAP), *asks]

    async def reserve_all() -> list[Any]:
        return await asyncio.gather(
            *(
                credit_reserve_on_loop(
                    **{**reserve_kwargs(owner, key, f"req_{number}", amount), "spend_cap": cap}
                )
                for number, (owner, key, amount, cap) in enumerate(everything)
            ),
            return_exceptions=True,
        )

    return on_a_loop(reserve_all)[1:], sizes


def test_reservations_that_meet_fit_in_their_order_and_a_refused_one_is_asked_again_alone(
    monkeypatch,
):
    org, key = used_key(credit_usd="1.2")  # 1.2 - COST available

    outcomes, sizes = _reservations_in_batches(
        monkeypatch, [(org, key, "0.7", CAP), (org, key, "0.7", CAP), (org, key, "0.3", CAP)]
    )

    # Together, the second and third did not fit after the first; alone, the third does.
    assert sizes == [1, 3, 1, 1]
    assert outcomes[0].amount_usd == Decimal("0.7")
    assert isinstance(outcomes[1], InsufficientCredit)
    assert outcomes[2].amount_usd == Decimal("0.3")
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 1
    assert KeySpend.objects.get(api_key=key).reserved_usd == 1


def test_windows_in_a_batch_fit_in_their_order_and_a_missing_one_is_left_to_the_sync_service(
    monkeypatch,
):
    org, key = used_key(credit_usd="100")
    small_cap = CapTerms(amount_usd=Decimal("0.5"), window=SpendCap.Window.MONTH)
    new_key, _ = make_key(org)  # no spend window yet

    outcomes, sizes = _reservations_in_batches(
        monkeypatch,
        [
            (org, key, "0.3", small_cap),
            (org, key, "0.3", small_cap),
            (org, new_key, "0.1", small_cap),
            (org, key, "0.1", small_cap),
        ],
    )

    assert sizes == [1, 4, 1, 1]
    assert outcomes[0].amount_usd == Decimal("0.3")
    assert isinstance(outcomes[1], SpendCapExceeded)
    assert outcomes[2] is None  # held nothing: credit_reserve makes the window
    assert outcomes[3].amount_usd == Decimal("0.1")
    assert KeySpend.objects.get(api_key=key).reserved_usd == Decimal("0.4")
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == (
        Decimal("0.4")
    )
    assert not KeySpend.objects.filter(api_key=new_key).exists()


def test_a_batch_settling_a_hold_the_sweeper_voided_still_counts_it_in_the_window(monkeypatch):
    org, key = used_key()
    other, other_key = used_key()
    for request_id in ("req_held", "req_voided"):
        credit_reserve(**reserve_kwargs(org, key, request_id, "1"))
    assert reservation_void(request_id="req_voided")  # an outage outlasted the sweep bound
    sizes = batch_sizes(monkeypatch, "settle")

    async def settle_all() -> list[Any]:
        return await asyncio.gather(
            # Goes at once, alone: the next two wait for it and go together.
            usage_settle_on_loop(metered=metered(other_key.pk, other.pk, request_id="o_1")),
            *(
                usage_settle_on_loop(metered=metered(key.pk, org.pk, request_id=request_id))
                for request_id in ("req_held", "req_voided")
            ),
        )

    on_a_loop(settle_all)

    assert sizes == [1, 2]
    window = KeySpend.objects.get(api_key=key)
    assert (window.spent_usd, window.reserved_usd) == (3 * COST, 0)
    wallet = Account.objects.get(organization=org, kind=Account.Kind.WALLET)
    assert (wallet.balance_usd, wallet.reserved_usd) == (Decimal("10") - 3 * COST, 0)
    assert_ledger_balanced()
