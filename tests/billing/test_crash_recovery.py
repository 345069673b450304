"""kill -9 of a gateway process with requests in flight: the sweeper resolves what it left
(voiding holds, or charging a stream's last usage checkpoint), the survivors' requests are
charged exactly once, and reconcile is clean."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.db import connection
from django.utils import timezone

from billing.models import Account, Reservation, UsageRecord
from billing.money import usage_cost_usd
from billing.selectors import ledger_violations, wallet_balance_usd
from billing.services import (
    credit_reserve,
    reservation_checkpoint,
    reservations_sweep,
    usage_settle,
)
from billing.settlement_spool import DEAD_LETTER_KEY, SPOOL_FILE, SPOOL_KEY
from billing.tasks import sweep_stale_reservations
from portal.redis_clients import redis_client
from tests.billing.test_ledger import PRICE, metered
from tests.factories import make_key, make_org
from tests.gateway.test_limits import BODY
from tests.ops.tcp_proxy import TcpProxy
from tests.servers import GatewayProcesses, child_database_url
from tests.services import free_port


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


STREAM_BODY = {
    "model": "fake-small",
    "messages": [{"role": "user", "content": "Tell the operator a long story please"}],
    "stream": True,
}


async def _stream_all(urls: list[str], key: str) -> list[str]:
    """Stream one request to each URL, reading every event; how each stream ended."""
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(url: str) -> str:
            try:
                async with client.stream(
                    "POST",
                    f"{url}/chat/completions",
                    json=STREAM_BODY,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    lines = [line async for line in response.aiter_lines() if line]
            except httpx.TransportError:
                return "connection lost"
            return "done" if lines[-1] == "data: [DONE]" else "unfinished"

        return await asyncio.gather(*(one(url) for url in urls))


def _wait_for_checkpoints(count: int, *, timeout: float = 20.0) -> None:
    """Poll from a worker thread until `count` held streams have checkpointed their usage."""
    deadline = time.monotonic() + timeout
    try:
        while (
            Reservation.objects.filter(
                state=Reservation.State.HELD, checkpoint_cost_usd__isnull=False
            ).count()
            < count
        ):
            assert time.monotonic() < deadline, "streams never checkpointed their usage"
            time.sleep(0.05)
    finally:
        connection.close()


def test_streams_killed_midway_are_charged_once_from_their_checkpoints(
    start_gateways, catalog, fake_provider, monkeypatch
):
    gateways = start_gateways(2)
    doomed, survivor = gateways.urls
    # 12 chunks half a second apart: each stream runs ~6 s and checkpoints about once a second.
    monkeypatch.setattr(fake_provider, "chunk_interval", 0.5)
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    async def scenario() -> list[str]:
        streams = asyncio.ensure_future(_stream_all([doomed] * 3 + [survivor], key))
        await asyncio.to_thread(_wait_for_checkpoints, 4)
        gateways.kill(0)
        return await streams

    outcomes = asyncio.run(scenario())

    assert outcomes == ["connection lost"] * 3 + ["done"]
    [finished] = UsageRecord.objects.all()
    assert (finished.status, finished.usage_source) == ("ok", "reported")
    killed = list(Reservation.objects.filter(state=Reservation.State.HELD))
    assert len(killed) == 3
    assert all(r.checkpoint_output_tokens and r.checkpoint_model == "fake-small" for r in killed)
    Reservation.objects.filter(state=Reservation.State.HELD).update(
        created_at=Reservation.objects.earliest("created_at").created_at - timedelta(hours=1)
    )

    assert sweep_stale_reservations.apply().get() == 3
    assert sweep_stale_reservations.apply().get() == 0

    for reservation in killed:
        record = UsageRecord.objects.get(request_id=reservation.request_id)
        assert record.status == UsageRecord.Status.INTERRUPTED
        assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
        assert record.output_tokens == reservation.checkpoint_output_tokens
        assert record.cost_usd == reservation.checkpoint_cost_usd > 0
        assert record.ledger_transaction is not None
        assert Reservation.objects.get(pk=reservation.pk).state == Reservation.State.SETTLED
    wallet = Account.objects.get(organization=org, kind=Account.Kind.WALLET)
    assert wallet.reserved_usd == 0
    records = UsageRecord.objects.all()
    assert len(records) == 4
    assert wallet.balance_usd == 10 - sum(record.cost_usd for record in records)
    assert ledger_violations(held_longer_than=timedelta(seconds=0)) == []


def _checkpointed(org, key, request_id: str, *, hold_usd: str, output_tokens: int) -> None:
    credit_reserve(
        request_id=request_id,
        organization_id=org.pk,
        api_key_id=key.pk,
        amount_usd=Decimal(hold_usd),
    )
    assert reservation_checkpoint(
        request_id=request_id,
        model="fake-small",
        provider="fake",
        upstream_model="fake-small-upstream",
        input_tokens=1000,
        output_tokens=output_tokens,
        price=PRICE,
    )
    Reservation.objects.filter(request_id=request_id).update(
        created_at=timezone.now() - timedelta(hours=1)
    )


@pytest.mark.django_db
def test_a_checkpoint_is_charged_once_even_if_the_stream_settles_late():
    org, other_org = make_org(credit_usd="10"), make_org(credit_usd="10")
    key, _ = make_key(org)
    _checkpointed(org, key, "req_ckpt", hold_usd="1", output_tokens=2000)
    checkpoint_cost = usage_cost_usd(price=PRICE, input_tokens=1000, output_tokens=2000)

    assert reservations_sweep(older_than=timedelta(minutes=15)) == 1
    late = usage_settle(
        metered=metered(key.pk, org.pk, request_id="req_ckpt", output_tokens=2500)
    )  # the "dead" process was only slow: its settle arrives after the sweep

    record = UsageRecord.objects.get(request_id="req_ckpt")
    assert late.pk == record.pk
    assert (record.status, record.cost_usd) == (UsageRecord.Status.INTERRUPTED, checkpoint_cost)
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - checkpoint_cost
    assert wallet_balance_usd(organization_id=other_org.pk) == Decimal("10")
    assert (
        reservation_checkpoint(
            request_id="req_ckpt",
            model="fake-small",
            provider="fake",
            upstream_model="fake-small-upstream",
            input_tokens=1,
            output_tokens=1,
            price=PRICE,
        )
        is False
    )  # settled: nothing left to checkpoint


@pytest.mark.django_db
def test_a_checkpoint_is_charged_at_most_the_amount_held():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    _checkpointed(org, key, "req_big", hold_usd="0.001", output_tokens=2_000_000)

    assert reservations_sweep(older_than=timedelta(minutes=15)) == 1

    assert UsageRecord.objects.get().cost_usd == Decimal("0.001")
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("9.999")


@pytest.mark.django_db
def test_a_swept_checkpoints_record_and_charge_carry_one_timestamp():
    # As a settled request's (tests/billing/test_ledger.py): the statement and the usage API
    # must put the swept charge in the same month.
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    _checkpointed(org, key, "req_swept", hold_usd="1", output_tokens=2000)

    assert reservations_sweep(older_than=timedelta(minutes=15)) == 1

    record = UsageRecord.objects.select_related("ledger_transaction").get()
    assert record.ledger_transaction is not None
    assert record.created_at == record.ledger_transaction.created_at


# --- PostgreSQL unreachable when a request settles ------------------------------------------


@pytest.fixture(params=["redis", "file", "slow pool"])
def cuttable_gateway(request, catalog, tmp_path, settings):
    """One gateway process whose only way to PostgreSQL is a proxy the test can cut (the test
    keeps its own connection), pooled as in production, quick to give up and to replay; its
    spool is Redis, or (param "file") the spool folder, its Redis being unreachable. With
    "slow pool" a settlement would wait 60 s for a pooled connection: only the gateway's own
    BILLING_SETTLE_WAIT_SECONDS keeps the client from waiting that long."""

    proxy = TcpProxy(target_port=int(settings.DATABASES["default"]["PORT"])).start()
    database_url = child_database_url().replace(
        f":{settings.DATABASES['default']['PORT']}/", f":{proxy.port}/"
    )
    spool = redis_client(settings.REDIS_URL)
    spool.delete(SPOOL_KEY, DEAD_LETTER_KEY)
    gateways = GatewayProcesses(
        1,
        env={
            "DATABASE_URL": database_url,
            "DATABASE_POOL": "true",
            "DATABASE_POOL_TIMEOUT_SECONDS": "60" if request.param == "slow pool" else "1",
            "BILLING_SETTLE_WAIT_SECONDS": "2",
            "BILLING_SPOOL_REPLAY_SECONDS": "1",
            "BILLING_SETTLEMENT_SPOOL_DIR": str(tmp_path / "spool"),
            "METRICS_TOKEN": "chaos-metrics",
            **(
                {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
                if request.param == "file"
                else {}
            ),
        },
    ).start()
    spool_kind = "file" if request.param == "file" else "redis"
    yield gateways.urls[0], proxy, spool_kind, tmp_path / "spool"
    gateways.stop()
    proxy.cut()
    spool.delete(SPOOL_KEY, DEAD_LETTER_KEY)


def _poll(condition, *, timeout: float = 30.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)
    finally:
        connection.close()


def test_usage_settled_while_the_database_is_down_is_charged_once_when_it_returns(
    cuttable_gateway, fake_provider, settings
):

    url, proxy, spool_kind, spool_dir = cuttable_gateway
    org, other = make_org(credit_usd="10"), make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.delay_next(2)  # the database goes away while the provider answers
    answers: list[httpx.Response] = []
    asking = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{url}/chat/completions",
                content=BODY,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                timeout=20,  # far less than the slow pool's wait
            )
        )
    )
    asking.start()
    _poll(
        lambda: Reservation.objects.filter(state=Reservation.State.HELD).exists(),
        what="the request never reserved",
    )

    proxy.cut()
    asking.join(30)

    answer = answers[0]
    assert answer.status_code == 200  # answered: its usage is spooled, not lost
    request_id = answer.headers["x-request-id"]
    assert not UsageRecord.objects.filter(request_id=request_id).exists()
    if spool_kind == "redis":
        assert redis_client(settings.REDIS_URL).llen(SPOOL_KEY) == 1
    else:
        assert (spool_dir / SPOOL_FILE).read_text().count(request_id) == 1

    proxy.restore()  # the process replays its spool by itself
    # A try still waiting for a connection when the request gave up may settle it first; the
    # replay then finds it settled. Either way the spool ends empty.
    _poll(
        lambda: (
            UsageRecord.objects.filter(request_id=request_id).exists()
            and redis_client(settings.REDIS_URL).llen(SPOOL_KEY) == 0
            and not list(spool_dir.glob("*.jsonl"))
        ),
        what="the spooled settlement was never replayed",
    )

    record = UsageRecord.objects.get(request_id=request_id)
    assert str(record.cost_usd) == answer.headers["x-switchboard-cost-usd"]
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd
    assert wallet_balance_usd(organization_id=other.pk) == Decimal("10")
    assert Reservation.objects.get(request_id=request_id).state == Reservation.State.SETTLED
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0
    scraped = httpx.get(  # scraped now: /metrics reads the database too
        url.removesuffix("/v1") + "/metrics", headers={"Authorization": "Bearer chaos-metrics"}
    ).text
    assert f'switchboard_gateway_settlements_spooled_total{{spool="{spool_kind}"}} 1.0' in scraped
