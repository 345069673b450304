"""Reservations: a request's worst case held on the wallet, resolved exactly once."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import Account, Reservation, UsageRecord
from billing.selectors import wallet_balance_usd
from billing.services import (
    InsufficientCredit,
    credit_clawback,
    credit_reserve,
    reservation_void,
    reservations_sweep,
    usage_settle,
)
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db


def wallet(organization_id: int) -> Account:
    return Account.objects.get(organization_id=organization_id, kind=Account.Kind.WALLET)


def reserve(org, key, request_id: str, amount: str) -> Reservation:
    return credit_reserve(
        request_id=request_id,
        organization_id=org.pk,
        api_key_id=key.pk,
        amount_usd=Decimal(amount),
    )


def test_holds_add_up_to_the_balance_and_no_further():
    org = make_org(credit_usd="1")
    key, _ = make_key(org)

    reserve(org, key, "a", "0.6")
    reserve(org, key, "b", "0.4")
    with pytest.raises(InsufficientCredit):
        reserve(org, key, "c", "0.0000000001")

    assert wallet(org.pk).reserved_usd == Decimal("1")
    assert wallet(org.pk).balance_usd == Decimal("1")
    assert not Reservation.objects.filter(request_id="c").exists()


def test_an_org_without_a_wallet_cannot_reserve():
    org = make_org(credit_usd=None)
    key, _ = make_key(org)

    with pytest.raises(InsufficientCredit):
        reserve(org, key, "a", "0.01")


def test_another_orgs_hold_does_not_count():
    org, other = make_org(credit_usd="1"), make_org(credit_usd="1")
    key, _ = make_key(org)
    other_key, _ = make_key(other)

    reserve(other, other_key, "theirs", "1")
    reserve(org, key, "ours", "1")

    assert wallet(org.pk).reserved_usd == wallet(other.pk).reserved_usd == Decimal("1")


def test_settling_charges_the_actual_cost_and_releases_the_hold():
    org = make_org(credit_usd="1")
    key, _ = make_key(org)
    reserve(org, key, "req_1", "0.5")

    usage_settle(metered=metered(key.pk, org.pk))  # costs 0.0035

    assert wallet(org.pk).reserved_usd == 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("0.9965")
    assert Reservation.objects.get().state == Reservation.State.SETTLED


def test_a_failed_request_voids_its_hold():
    org = make_org(credit_usd="1")
    key, _ = make_key(org)
    reserve(org, key, "req_1", "0.5")

    usage_settle(
        metered=metered(
            key.pk,
            org.pk,
            status=UsageRecord.Status.UPSTREAM_ERROR,
            input_tokens=0,
            output_tokens=0,
        )
    )

    assert Reservation.objects.get().state == Reservation.State.VOIDED
    assert wallet(org.pk).reserved_usd == 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("1")


def test_a_hold_is_released_once_however_often_it_is_resolved():
    org = make_org(credit_usd="1")
    key, _ = make_key(org)
    reserve(org, key, "req_1", "0.5")
    reserve(org, key, "req_2", "0.25")

    assert reservation_void(request_id="req_1") is True
    assert reservation_void(request_id="req_1") is False
    usage_settle(metered=metered(key.pk, org.pk))  # req_1 again: charged, nothing released
    assert reservation_void(request_id="never-made") is False

    assert wallet(org.pk).reserved_usd == Decimal("0.25")
    assert Reservation.objects.get(request_id="req_1").state == Reservation.State.VOIDED


def test_the_sweeper_voids_stale_holds_and_settles_recorded_ones():
    org = make_org(credit_usd="1")
    key, _ = make_key(org)
    reserve(org, key, "req_1", "0.1")  # recorded (the charge made it), release was lost
    reserve(org, key, "req_2", "0.2")  # its process died before any usage
    reserve(org, key, "fresh", "0.3")  # still running
    UsageRecord.objects.create(
        request_id="req_1",
        organization=org,
        api_key=key,
        model="m",
        provider="p",
        upstream_model="m",
        status=UsageRecord.Status.OK,
        http_status=200,
        usage_source=UsageRecord.UsageSource.REPORTED,
        latency_ms=1,
    )
    Reservation.objects.exclude(request_id="fresh").update(
        created_at=Reservation.objects.get(request_id="fresh").created_at - timedelta(hours=1)
    )

    assert reservations_sweep(older_than=timedelta(minutes=15)) == 2
    assert reservations_sweep(older_than=timedelta(minutes=15)) == 0

    states = dict(Reservation.objects.values_list("request_id", "state"))
    assert states == {"req_1": "settled", "req_2": "voided", "fresh": "held"}
    assert wallet(org.pk).reserved_usd == Decimal("0.3")


def test_a_clawback_may_leave_the_wallet_negative_and_then_nothing_is_admitted():
    org = make_org(credit_usd="1")
    key, _ = make_key(org)

    credit_clawback(organization=org, amount_usd=Decimal("1.5"), reason="chargeback")

    assert wallet_balance_usd(organization_id=org.pk) == Decimal("-0.5")
    with pytest.raises(InsufficientCredit):
        reserve(org, key, "req", "0")
