"""The settlement spool: requests the database could not settle are replayed into
`usage_settle`, charged exactly once however often they are spooled or replayed, from Redis
or, while Redis is down too, from the spool file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command

from billing.models import Account, KeySpend, Reservation, SpendCap, UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from billing.services import CapTerms, credit_reserve, reservations_sweep, usage_settle
from billing.settlement_spool import (
    DEAD_LETTER_KEY,
    SPOOL_FILE,
    SPOOL_KEY,
    metered_decode,
    metered_encode,
    settlement_spool,
    spooled_settlements_replay,
)
from billing.tasks import replay_spooled_settlements
from portal.redis_clients import redis_client
from tests.billing.test_ledger import PRICE, metered
from tests.factories import make_key, make_org
from tests.services import free_port

COST = usage_cost_usd(price=PRICE, input_tokens=1000, output_tokens=2000)


@pytest.fixture(autouse=True)
def spool(settings, tmp_path) -> Iterator[None]:
    """An empty spool: its own folder, and the shared Redis list cleared before and after."""
    settings.BILLING_SETTLEMENT_SPOOL_DIR = tmp_path / "spool"
    client = redis_client(settings.REDIS_URL)  # the suite's Redis, whatever a test points at
    client.delete(SPOOL_KEY, DEAD_LETTER_KEY)
    yield
    client.delete(SPOOL_KEY, DEAD_LETTER_KEY)


def _reserved_request(request_id: str = "req_spooled"):
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    credit_reserve(
        request_id=request_id, organization_id=org.pk, api_key_id=key.pk, amount_usd=Decimal("1")
    )
    return org, metered(key.pk, org.pk, request_id=request_id)


def test_an_entry_keeps_every_field_exactly():
    request = metered(
        1,
        2,
        price=Price(
            input_per_mtok_usd=Decimal("0.123456789"),
            output_per_mtok_usd=Decimal("1.5"),
            cache_write_input_per_mtok_usd=Decimal("0.75"),
        ),
        time_to_first_token_ms=40,
        cache_write_input_tokens=7,
        charge_limit_usd=Decimal("0.0000012345"),
    )
    assert metered_decode(metered_encode(request)) == request


def test_a_request_spooled_twice_is_charged_once(db, settings):
    org, request = _reserved_request()
    other = make_org(credit_usd="10")
    assert settlement_spool(metered=request) == "redis"
    assert settlement_spool(metered=request) == "redis"  # two tries of one request spooled

    outcome = spooled_settlements_replay()

    assert (outcome.settled, outcome.dead, outcome.remaining) == (2, 0, False)
    assert UsageRecord.objects.filter(request_id="req_spooled").count() == 1
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST
    assert wallet_balance_usd(organization_id=other.pk) == Decimal("10")
    assert Reservation.objects.get(request_id="req_spooled").state == Reservation.State.SETTLED
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0
    assert redis_client(settings.REDIS_URL).llen(SPOOL_KEY) == 0


def test_a_replay_of_a_request_already_settled_charges_nothing_more(db):
    org, request = _reserved_request()
    usage_settle(metered=request)  # the try that timed out for the gateway had committed
    settlement_spool(metered=request)

    assert spooled_settlements_replay().settled == 1
    assert spooled_settlements_replay().settled == 0  # the spool is empty now

    assert UsageRecord.objects.filter(request_id="req_spooled").count() == 1
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST


def test_it_spools_to_a_file_while_redis_is_down_and_replays_it(db, settings):
    org, request = _reserved_request()
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    assert settlement_spool(metered=request) == "file"
    assert (settings.BILLING_SETTLEMENT_SPOOL_DIR / SPOOL_FILE).read_text().count("\n") == 1

    outcome = spooled_settlements_replay()

    assert outcome.settled == 1
    assert outcome.remaining  # the Redis list could not be read: a replay will come again
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST
    assert list(settings.BILLING_SETTLEMENT_SPOOL_DIR.iterdir()) == []


def test_a_replay_after_the_sweeper_voided_the_hold_still_charges_the_usage(db):
    org, request = _reserved_request()
    settlement_spool(metered=request)
    assert reservations_sweep(older_than=timedelta(0)) == 1  # voided: no usage record yet
    assert Reservation.objects.get(request_id="req_spooled").state == Reservation.State.VOIDED

    spooled_settlements_replay()

    assert UsageRecord.objects.get(request_id="req_spooled").cost_usd == COST
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST
    assert Account.objects.get(organization=org, kind=Account.Kind.WALLET).reserved_usd == 0


@pytest.mark.parametrize("first_use", [True, False], ids=["orm", "one-statement"])
def test_a_replay_after_the_sweeper_voided_the_hold_still_counts_in_the_spend_window(db, first_use):
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    make_key(make_org(credit_usd="10"))  # another organisation, untouched
    cap = CapTerms(amount_usd=Decimal("5"), window=SpendCap.Window.MONTH)
    request_ids = ["req_spooled"] if first_use else ["req_earlier", "req_spooled"]
    for request_id in request_ids:
        credit_reserve(
            request_id=request_id,
            organization_id=org.pk,
            api_key_id=key.pk,
            amount_usd=Decimal("1"),
            spend_cap=cap,
        )
    if not first_use:  # the window and accounts exist: the one-statement settlement runs
        usage_settle(metered=metered(key.pk, org.pk, request_id="req_earlier"))
    settlement_spool(metered=metered(key.pk, org.pk, request_id="req_spooled"))
    assert reservations_sweep(older_than=timedelta(0)) == 1  # voided: no usage record yet

    spooled_settlements_replay()

    window = KeySpend.objects.get(api_key=key)
    assert window.spent_usd == COST * len(request_ids)
    assert window.reserved_usd == 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST * len(request_ids)


def test_an_entry_that_cannot_settle_is_set_aside_and_the_rest_are_settled(db, settings):
    org, request = _reserved_request()
    client = redis_client(settings.REDIS_URL)
    client.lpush(SPOOL_KEY, b"{not json")
    settlement_spool(metered=request)

    outcome = spooled_settlements_replay()

    assert (outcome.settled, outcome.dead) == (1, 1)
    assert client.lrange(DEAD_LETTER_KEY, 0, -1) == [b"{not json"]
    assert client.llen(SPOOL_KEY) == 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST


def test_the_beat_task_replays_the_spool(db):
    org, request = _reserved_request()
    settlement_spool(metered=request)

    assert replay_spooled_settlements.apply().get() == 1
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST


def test_the_command_replays_the_spool(db, capsys):
    org, request = _reserved_request()
    settlement_spool(metered=request)

    call_command("replay_settlements")

    assert "settled 1, set aside 0" in capsys.readouterr().out
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - COST
