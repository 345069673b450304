"""On PostgreSQL a request's reservation and its settlement are one statement each
(billing/hot_path_sql.py), and a statement that must not commit leaves nothing behind."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import Account, KeySpend, Reservation, SpendCap, UsageRecord
from billing.services import CapTerms, InsufficientCredit, credit_reserve, usage_settle
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db(transaction=True)

CAP = CapTerms(amount_usd=Decimal("5"), window=SpendCap.Window.MONTH)
NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def reserve(org, key, request_id: str, amount: str) -> None:
    credit_reserve(
        request_id=request_id,
        organization_id=org.pk,
        api_key_id=key.pk,
        amount_usd=Decimal(amount),
        spend_cap=CAP,
        now=NOW,
    )


def test_it_reserves_and_settles_in_one_statement_each():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    make_key(make_org(credit_usd="10"))  # another organisation's key, untouched
    reserve(org, key, "req_first", "0.01")  # a window's first use makes its row
    usage_settle(metered=metered(key.pk, org.pk, request_id="req_first"))

    with CaptureQueriesContext(connection) as queries:
        reserve(org, key, "req_1", "0.01")
        usage_settle(metered=metered(key.pk, org.pk, request_id="req_1"))

    assert len(queries.captured_queries) == 2


def test_a_capped_key_refused_by_its_wallet_holds_nothing_in_its_window():
    org = make_org(credit_usd="0.01")
    key, _ = make_key(org)
    reserve(org, key, "req_1", "0.006")

    with pytest.raises(InsufficientCredit):
        reserve(org, key, "req_2", "0.006")  # fits the cap, not the wallet

    assert KeySpend.objects.get(api_key=key).reserved_usd == Decimal("0.006")
    assert not Reservation.objects.filter(request_id="req_2").exists()


def test_the_first_charge_of_an_installation_makes_its_revenue_account():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    assert not Account.objects.filter(kind=Account.Kind.REVENUE).exists()

    record = usage_settle(metered=metered(key.pk, org.pk, request_id="req_1"))

    revenue = Account.objects.get(kind=Account.Kind.REVENUE)
    assert revenue.balance_usd == record.cost_usd == Decimal("0.0035")


def test_the_returned_usage_record_is_the_stored_one():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    usage_settle(metered=metered(key.pk, org.pk, request_id="req_warm"))

    record = usage_settle(metered=metered(key.pk, org.pk, request_id="req_1"))

    stored = UsageRecord.objects.get(request_id="req_1")
    assert (record.pk, record.cost_usd, record.ledger_transaction_id) == (
        stored.pk,
        stored.cost_usd,
        stored.ledger_transaction_id,
    )
