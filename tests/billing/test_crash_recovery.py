"""kill -9 of a gateway process with requests in flight: the sweeper resolves what it left,
the survivors' requests are charged exactly once, and reconcile is clean."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import httpx
from django.db import connection

from billing.models import Account, Reservation, UsageRecord
from billing.tasks import sweep_stale_reservations
from tests.factories import make_key, make_org
from tests.gateway.test_limits import BODY


async def _post_all(urls: list[str], key: str) -> list[int | str]:
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(url: str) -> int | str:
            try:
                response = await client.post(
                    f"{url}/chat/completions",
                    content=BODY,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
            except httpx.TransportError:
                return "connection lost"
            return response.status_code

        return await asyncio.gather(*(one(url) for url in urls))


def _wait_for_holds(count: int, *, timeout: float = 20.0) -> None:
    """Poll from a worker thread, closing that thread's own database connection after."""
    deadline = time.monotonic() + timeout
    try:
        while Reservation.objects.filter(state=Reservation.State.HELD).count() < count:
            assert time.monotonic() < deadline, "requests never reached the reservation step"
            time.sleep(0.05)
    finally:
        connection.close()


def test_a_killed_process_leaves_nothing_held_after_the_sweep(
    start_gateways, catalog, fake_provider
):
    gateways = start_gateways(2)
    doomed, survivor = gateways.urls
    fake_provider.latency = 2.0  # requests are in flight at the upstream when the kill lands
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    async def scenario() -> list[int | str]:
        requests = asyncio.ensure_future(_post_all([doomed] * 6 + [survivor] * 2, key))
        await asyncio.to_thread(_wait_for_holds, 8)
        gateways.kill(0)
        return await requests

    outcomes = asyncio.run(scenario())

    assert outcomes == ["connection lost"] * 6 + [200, 200]
    wallet = Account.objects.get(organization=org, kind=Account.Kind.WALLET)
    assert wallet.reserved_usd > 0  # the dead process's holds are still there…
    Reservation.objects.filter(state=Reservation.State.HELD).update(
        created_at=Reservation.objects.earliest("created_at").created_at - timedelta(hours=1)
    )

    assert sweep_stale_reservations.apply().get() == 6  # …until the sweeper runs (beat: 1/min)
    assert sweep_stale_reservations.apply().get() == 0

    wallet.refresh_from_db()
    assert wallet.reserved_usd == 0
    states = sorted(Reservation.objects.values_list("state", flat=True))
    assert states == ["settled"] * 2 + ["voided"] * 6
    records = UsageRecord.objects.all()
    assert len(records) == 2
    assert wallet.balance_usd == 10 - sum(record.cost_usd for record in records)
