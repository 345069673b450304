"""On PostgreSQL a request's reservation and its settlement are one statement each
(billing/hot_path_sql.py), and a statement that must not commit leaves nothing behind."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.test import override_settings
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


def test_it_prepares_each_statement_once_per_connection():
    org = make_org(credit_usd="3")
    key, _ = make_key(org)
    make_key(make_org(credit_usd="10"))
    for number in range(3):
        reserve(org, key, f"req_{number}", "0.01")
        usage_settle(metered=metered(key.pk, org.pk, request_id=f"req_{number}"))
    for number in range(3):  # refused by the wallet after the window fitted: aborted on purpose
        with pytest.raises(InsufficientCredit):
            reserve(org, key, f"req_refused_{number}", "4")

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement for (statement,) in cursor.fetchall()]
    # One plan each, reused by every request: PostgreSQL neither parses nor plans them again.
    assert sum("INSERT INTO billing_reservation" in statement for statement in prepared) == 1
    assert sum("INSERT INTO billing_usagerecord" in statement for statement in prepared) == 1


@override_settings(DATABASE_PREPARED_STATEMENTS=False)
def test_without_prepared_statements_it_sends_each_statement_whole():
    org = make_org(credit_usd="10")
    key, _ = make_key(org)
    reserve(org, key, "req_first", "0.01")  # the first uses make the window and accounts
    usage_settle(metered=metered(key.pk, org.pk, request_id="req_first"))

    with CaptureQueriesContext(connection) as queries:
        reserve(org, key, "req_1", "0.01")
        usage_settle(metered=metered(key.pk, org.pk, request_id="req_1"))

    assert [query["sql"].lstrip()[:4] for query in queries.captured_queries] == ["WITH"] * 2
    assert UsageRecord.objects.get(request_id="req_1").cost_usd > 0


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
